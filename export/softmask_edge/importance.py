"""SPG's importance update in numpy, for runtimes without an importance graph (ExecuTorch).

The ONNX Runtime learner runs the same maths as `importance_update.onnx`
(`graphs.importance_update_model`); both follow softmask_peft's `normalize_importance`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .storage import decode, encode


def normalize(g: np.ndarray) -> np.ndarray:
    """|tanh((g − mean g) / std g)| over the whole tensor, float32 (Konishi et al. 2023).

    std is unbiased; a tensor of one element, or whose std is 0 or not finite, gets 0 (the
    official code divides by zero there), as `softmask_peft.importance.normalize_importance`.
    """
    g = np.asarray(g, np.float32)
    if g.size < 2:
        return np.zeros_like(g)
    std = g.std(ddof=1, dtype=np.float32)
    if not np.isfinite(std) or std == 0:
        return np.zeros_like(g)
    return np.abs(np.tanh((g - g.mean(dtype=np.float32)) / std)).astype(np.float32)


def shape(gamma: np.ndarray, sharpness: float = 1.0, budget: float = 1.0) -> np.ndarray:
    """softmask_peft.capacity.shape_task_importance for one tensor: only the top ⌈budget·n⌉
    values kept (ties included), then γ**sharpness; (1, 1) returns `gamma` unchanged."""
    if budget < 1.0 and gamma.size > 0:
        k = max(1, math.ceil(budget * gamma.size))
        threshold = np.partition(gamma.ravel(), gamma.size - k)[gamma.size - k]
        gamma = np.where(gamma >= threshold, gamma, np.float32(0.0))
    if sharpness != 1.0:
        gamma = np.power(gamma, np.float32(sharpness))
    return gamma.astype(np.float32)


def update_importance(
    grads: Mapping[str, Sequence[np.ndarray]],
    stored: Mapping[str, np.ndarray],
    dtype: str,
    sharpness: float = 1.0,
    budget: float = 1.0,
    decay: float = 1.0,
    cross_heads: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """(γ^t, A' = max(decay · A, γ^t), ā') from the per-head gradient sums g_h of every masked P.

    γ^t[P] = shape(max_h normalize(g_h[P])) (only the last, current head with
    `cross_heads=False`); `stored` and both returned maps are in the storage dtype; ā' (shape
    [1], float32) is the element-weighted mean of the stored A', so it agrees with what the
    next task's steps decode. The defaults are the paper's rule.
    """
    task, updated = {}, {}
    total, count = np.float32(0.0), 0
    for name, per_head in grads.items():
        heads = per_head if cross_heads else per_head[-1:]
        gamma = shape(np.max(np.stack([normalize(g) for g in heads]), axis=0), sharpness, budget)
        old = decode(stored[name])
        if decay != 1.0:
            old = old * np.float32(decay)
        task[name] = encode(gamma, dtype)
        updated[name] = encode(np.maximum(old, gamma), dtype)
        total += decode(updated[name]).sum(dtype=np.float32)
        count += updated[name].size
    return task, updated, np.array([total / max(count, 1)], np.float32)
