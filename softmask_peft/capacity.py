"""Capacity: how much of the network stays free to learn, and the options that keep it free.

A soft-masked step moves a masked value by keep = 1 − A of its plain step, and the heads by one
scalar 1 − ā. Under the paper's rule every task's importance γ^t is kept whole and
A^t = max(A^{t-1}, γ^t) only grows, so a long task sequence freezes most of the network.
`SoftMaskConfig`'s capacity options change what each task claims (`shape_task_importance`) and
how long it keeps it (`importance_decay`, applied by the store):

    γ ← γ^s                                   importance_sharpness s >= 1
    γ[i] ← γ[i] if γ[i] is among the top ⌈b·n⌉ values of its tensor, else 0
                                              importance_budget b in (0, 1]
    A^t = max(d · A^{t-1}, γ^t)               importance_decay d in (0, 1]

and the statistics below show where a run stands:

    mean keep  = Σ_p Σ_i (1 − A_p[i]) / Σ_p numel(p)          (element-weighted, masked params)
    saturation = share of masked values with A > threshold   (near-frozen: keep < 1 − threshold)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

SATURATION_THRESHOLD = 0.9


def shape_task_importance(
    importance: Mapping[str, Tensor], sharpness: float = 1.0, budget: float | None = None
) -> dict[str, Tensor]:
    """One task's importance after the sharpness and budget options (see the module docstring).

    With the paper's values (1.0, None) the tensors are returned untouched (bit-identical).
    The budget keeps every value tied with the ⌈b·n⌉-th largest.
    """
    out = {}
    for name, g in importance.items():
        if budget is not None and budget < 1.0 and g.numel() > 0:
            k = max(1, math.ceil(budget * g.numel()))
            threshold = torch.topk(g.flatten(), k, sorted=False).values.min()
            g = torch.where(g >= threshold, g, torch.zeros_like(g))
        if sharpness != 1.0:
            g = g.pow(sharpness)
        out[name] = g
    return out


@dataclass(frozen=True)
class ImportanceStats:
    """Element-weighted statistics of one set of importance tensors."""

    values: int
    mean_importance: float
    saturation: float

    @property
    def mean_keep(self) -> float:
        """Mean of keep = 1 − A: the average share of a plain step a masked value still takes."""
        return 1.0 - self.mean_importance


def importance_stats(
    importance: Mapping[str, Tensor], threshold: float = SATURATION_THRESHOLD
) -> ImportanceStats:
    """Mean importance and the share of values above `threshold`, over all elements."""
    total, above, count = 0.0, 0, 0
    for a in importance.values():
        a = a.detach()
        total += float(a.sum(dtype=torch.float64))
        above += int((a > threshold).sum())
        count += a.numel()
    if count == 0:
        return ImportanceStats(0, 0.0, 0.0)
    return ImportanceStats(count, total / count, above / count)


@dataclass(frozen=True)
class CapacityReport:
    """What `SoftMaskModel.capacity()` returns.

    `overall`: the accumulated importance of the masked parameters, as the optimizer applies it
    (DAS: mapped from units to parameters, general importance included). `per_parameter`: the
    same, per masked parameter. `per_task[k]`: task k's own importance as stored (SPG:
    parameters; DAS: units). `head_keep`: the factor 1 − ā the scaled heads train at now;
    `new_head_keep`: the current task's own head (1.0 when `head_scaling="except_new"` leaves
    it unscaled, None without a per-task head or an open task).
    """

    threshold: float
    overall: ImportanceStats
    per_parameter: dict[str, ImportanceStats]
    per_task: tuple[ImportanceStats, ...]
    head_keep: float
    new_head_keep: float | None

    @property
    def mean_keep(self) -> float:
        return self.overall.mean_keep

    @property
    def saturation(self) -> float:
        return self.overall.saturation


__all__ = [
    "SATURATION_THRESHOLD",
    "CapacityReport",
    "ImportanceStats",
    "importance_stats",
    "shape_task_importance",
]
