"""Continual-learning metrics over an accuracy matrix.

R[i][j] = accuracy on task j's test set after training task i (T tasks, 0-based). A method
that trains once on all tasks (joint) has only the final row; its BWT and Forgetting are None.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from softmask_peft.errors import ConfigError


def _matrix(r: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    m = np.asarray(r, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] == 0 or m.shape[0] not in (1, m.shape[1]):
        raise ConfigError(
            f"an accuracy matrix must be T x T (or 1 x T, final row only), got shape {m.shape}"
        )
    return m


def average_accuracy(r: Sequence[Sequence[float]] | np.ndarray) -> float:
    """ACC = mean_j R[T-1][j]: accuracy over all tasks after the last one."""
    return float(_matrix(r)[-1].mean())


def backward_transfer(r: Sequence[Sequence[float]] | np.ndarray) -> float | None:
    """BWT = mean_{j<T-1} (R[T-1][j] - R[j][j]) (Lopez-Paz & Ranzato 2017); negative = forgetting.

    None for a single task or a final-row-only matrix.
    """
    m = _matrix(r)
    t = m.shape[1]
    if t < 2 or m.shape[0] == 1:
        return None
    return float(np.mean([m[t - 1, j] - m[j, j] for j in range(t - 1)]))


def forgetting(r: Sequence[Sequence[float]] | np.ndarray) -> float | None:
    """F = mean_{j<T-1} max_{j<=l<T-1} (R[l][j] - R[T-1][j]) (Chaudhry et al. 2018).

    Only rows after task j was learned count. None for a single task or a final-row-only matrix.
    """
    m = _matrix(r)
    t = m.shape[1]
    if t < 2 or m.shape[0] == 1:
        return None
    return float(np.mean([max(m[j : t - 1, j]) - m[t - 1, j] for j in range(t - 1)]))


def plasticity(r: Sequence[Sequence[float]] | np.ndarray) -> float | None:
    """P = mean_j R[j][j]: accuracy on each task right after learning it (how well new tasks
    are learned, before any forgetting). None for a final-row-only matrix."""
    m = _matrix(r)
    if m.shape[0] == 1 and m.shape[1] > 1:
        return None
    return float(np.mean(np.diag(m)))


def compute_metrics(r: Sequence[Sequence[float]] | np.ndarray) -> dict[str, float | None]:
    """{"acc", "bwt", "forgetting", "plasticity"} of one accuracy matrix."""
    return {
        "acc": average_accuracy(r),
        "bwt": backward_transfer(r),
        "forgetting": forgetting(r),
        "plasticity": plasticity(r),
    }


def mean_std(values: Sequence[float | None]) -> tuple[float, float] | None:
    """Mean and sample std (ddof=1; 0 for one value) over seeds; None if any value is None."""
    if not values or any(v is None for v in values):
        return None
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return float(arr.mean()), std
