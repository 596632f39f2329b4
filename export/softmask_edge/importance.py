"""SPG's importance update in numpy, for runtimes without an importance graph (ExecuTorch).

The ONNX Runtime learner runs the same maths as `importance_update.onnx`
(`graphs.importance_update_model`); both follow softmask_peft's `normalize_importance`.
"""

from __future__ import annotations

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


def update_importance(
    grads: Mapping[str, Sequence[np.ndarray]], stored: Mapping[str, np.ndarray], dtype: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """(γ^t, A' = max(A, γ^t), ā') from the per-head gradient sums g_h of every masked P.

    γ^t[P] = max_h normalize(g_h[P]); `stored` and both returned maps are in the storage
    dtype; ā' (shape [1], float32) is the element-weighted mean of the stored A', so it
    agrees with what the next task's steps decode.
    """
    task, updated = {}, {}
    total, count = np.float32(0.0), 0
    for name, per_head in grads.items():
        gamma = np.max(np.stack([normalize(g) for g in per_head]), axis=0)
        task[name] = encode(gamma, dtype)
        updated[name] = encode(np.maximum(decode(stored[name]), gamma), dtype)
        total += decode(updated[name]).sum(dtype=np.float32)
        count += updated[name].size
    return task, updated, np.array([total / max(count, 1)], np.float32)
