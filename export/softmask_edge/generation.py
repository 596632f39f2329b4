"""Generation 0 of an export, for every runtime: role checks, stored importance, manifest.

numpy only (no onnx, no torch): `build_artifacts` (ONNX) and `build_executorch_artifacts`
write their programs and checkpoint, then share this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from softmask_format.keys import task_key

from .errors import ExportError
from .manifest import (
    IMPORTANCE_SUFFIX,
    MEAN_IMPORTANCE,
    Manifest,
    checkpoint_name,
    history_name,
    sha256,
)
from .storage import decode, encode, write_history


def check_roles(
    params: Mapping[str, tuple[int, ...]],
    not_float32: Sequence[str],
    trainable: Sequence[str],
    masked: Sequence[str],
    heads: Sequence[str],
    importance: Mapping[str, np.ndarray],
) -> None:
    """Every role names a float32 parameter (`params`: name -> shape), masked and heads are
    distinct trainable ones, and every masked one has importance of its shape in [0, 1]."""
    problems = [
        f"parameter {n!r} is not an initializer of the graph" for n in trainable if n not in params
    ]
    problems += [f"masked {n!r} is not trainable" for n in masked if n not in trainable]
    problems += [f"head {n!r} is not trainable" for n in heads if n not in trainable]
    problems += [f"{n!r} is both masked and a head" for n in sorted(set(masked) & set(heads))]
    problems += [f"no importance for masked {n!r}" for n in masked if n not in importance]
    problems += [f"importance for unmasked {n!r}" for n in sorted(set(importance) - set(masked))]
    for n in masked:
        if n in importance and n in params:
            a, dims = importance[n], tuple(params[n])
            if a.shape != dims:
                problems.append(f"importance of {n!r}: shape {a.shape} != parameter {dims}")
            elif a.size and not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
                problems.append(f"importance of {n!r}: values outside [0, 1]")
    problems += [f"parameter {n!r} is not float32" for n in trainable if n in not_float32]
    if problems:
        raise ExportError("cannot build artifacts:\n  " + "\n  ".join(problems))


def stored_importance(
    masked: Sequence[str], importance: Mapping[str, np.ndarray], dtype: str
) -> dict[str, np.ndarray]:
    """`P.softmask_importance` (storage dtype) of every masked P and ā (shape [1], float32),
    the mean of the stored, decoded A over all masked elements."""
    stored = {n + IMPORTANCE_SUFFIX: encode(importance[n], dtype) for n in masked}
    total = sum(a.size for a in stored.values())
    mean = sum(float(decode(a).sum()) for a in stored.values())
    stored[MEAN_IMPORTANCE] = np.array([mean / max(total, 1)], np.float32)
    return stored


def first_generation(
    staging: Path, files: Sequence[str], history: Sequence[Mapping[str, np.ndarray]], **fields
) -> Manifest:
    """Write generation 0's importance history and the manifest (checkpoint already written).

    `files` are the export's static files (hashed); `history` the per-task importance
    (float32) of the tasks already learned.
    """
    masked, dtype = fields["masked"], fields["importance_dtype"]
    write_history(
        staging / history_name(0),
        {
            task_key(k, n): encode(np.asarray(task[n], np.float32), dtype)
            for k, task in enumerate(history)
            for n in masked
        },
    )
    manifest = Manifest(
        **fields,
        num_tasks=len(history),
        checkpoint=checkpoint_name(0),
        checkpoint_sha256=sha256(staging / checkpoint_name(0)),
        history=history_name(0),
        history_sha256=sha256(staging / history_name(0)),
        graphs_sha256={n: sha256(staging / n) for n in files},
    )
    manifest.save(staging)
    return manifest
