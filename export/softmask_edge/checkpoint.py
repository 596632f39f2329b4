"""Read and validate the current checkpoint generation of an artifacts directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from softmask_format.keys import task_key

from .errors import ArtifactMismatchError, CorruptArtifactError
from .manifest import IMPORTANCE_SUFFIX, MEAN_IMPORTANCE, Manifest
from .storage import NUMPY_DTYPES, decode, read_history


def importance_problems(name: str, stored: np.ndarray, dtype: np.dtype) -> list[str]:
    """Why `stored` is not importance in the storage dtype: wrong dtype, NaN/Inf, outside [0, 1]."""
    if stored.dtype != dtype:
        return [f"{name}: dtype {stored.dtype}, the manifest's importance dtype stores {dtype}"]
    a = decode(stored)
    if not np.isfinite(a).all():
        return [f"{name}: NaN or Inf importance"]
    if a.size and (a.min() < 0 or a.max() > 1):
        return [f"{name}: importance outside [0, 1] (min {a.min():.4g}, max {a.max():.4g})"]
    return []


def load_state(directory: Path, manifest: Manifest) -> Any:
    """Load the ONNX Runtime checkpoint named by the manifest (hashes verified by the caller)
    and check its names, shapes, dtypes and importance values (a `CheckpointState`)."""
    from . import _ort  # onnxruntime: not needed by ExecuTorch artifacts

    with _ort.translated(f"cannot read checkpoint {manifest.checkpoint}", CorruptArtifactError):
        state = _ort.load_checkpoint(directory / manifest.checkpoint)
        found = {n: _ort.get_parameter(state, n) for n in _ort.parameter_names(state)}
    check_checkpoint(found, manifest)
    return state


def load_arrays(directory: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """Load and check the ExecuTorch checkpoint: an uncompressed .npz of the same tensors."""
    found = read_history(directory / manifest.checkpoint, "checkpoint")
    check_checkpoint(found, manifest)
    return found


def check_checkpoint(found: dict[str, np.ndarray], manifest: Manifest) -> None:
    """Weights float32 of the manifest's shapes, A_P in the storage dtype within [0, 1], ā."""
    expected = {n: (tuple(s), np.dtype(np.float32)) for n, s in manifest.params.items()}
    stored = np.dtype(NUMPY_DTYPES[manifest.importance_dtype])
    expected.update(
        {n + IMPORTANCE_SUFFIX: (tuple(manifest.params[n]), stored) for n in manifest.masked}
    )
    expected[MEAN_IMPORTANCE] = ((1,), np.dtype(np.float32))
    problems = [f"missing parameter {n!r}" for n in sorted(set(expected) - set(found))]
    problems += [f"unexpected parameter {n!r}" for n in sorted(set(found) - set(expected))]
    for n in sorted(set(expected) & set(found)):
        data, (shape, dtype) = found[n], expected[n]
        if data.shape != shape or data.dtype != dtype:
            problems.append(f"{n}: {data.dtype}{list(data.shape)} != expected {dtype}{list(shape)}")
        elif n.endswith(IMPORTANCE_SUFFIX):
            problems += importance_problems(n, data, stored)
        elif n == MEAN_IMPORTANCE:
            problems += importance_problems(n, data, np.dtype(np.float32))
    if problems:
        raise ArtifactMismatchError(
            f"checkpoint {manifest.checkpoint} does not fit the manifest:\n  "
            + "\n  ".join(problems)
        )


def load_history(directory: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """Per-task importance `task.{k}.{P}` for every finished task k, in the storage dtype."""
    history = read_history(directory / manifest.history)
    wanted = {
        task_key(k, n): tuple(manifest.params[n])
        for k in range(manifest.num_tasks)
        for n in manifest.masked
    }
    problems = [f"missing {k!r}" for k in sorted(set(wanted) - set(history))]
    problems += [f"unexpected {k!r}" for k in sorted(set(history) - set(wanted))]
    stored = np.dtype(NUMPY_DTYPES[manifest.importance_dtype])
    for k in sorted(set(wanted) & set(history)):
        if history[k].shape != wanted[k]:
            problems.append(f"{k}: shape {history[k].shape} != {wanted[k]}")
        else:
            problems += importance_problems(k, history[k], stored)
    if problems:
        raise ArtifactMismatchError(
            f"importance history {manifest.history} does not fit the manifest:\n  "
            + "\n  ".join(problems)
        )
    return history


@dataclass
class DeviceCheckpoint:
    """What a device learned: weights, accumulated importance and per-task importance (float32)."""

    manifest: Manifest
    weights: dict[str, np.ndarray]
    importance: dict[str, np.ndarray]
    history: list[dict[str, np.ndarray]]


def read_device_checkpoint(directory: str | os.PathLike) -> DeviceCheckpoint:
    """Read the current generation of `directory` (validated) for the server side."""
    directory = Path(directory)
    manifest = Manifest.load(directory)
    manifest.verify_files(directory)
    if manifest.runtime == "executorch":
        state = load_arrays(directory, manifest)
    else:
        from . import _ort  # onnxruntime: not needed by ExecuTorch artifacts

        ort_state = load_state(directory, manifest)
        state = {n: _ort.get_parameter(ort_state, n) for n in _ort.parameter_names(ort_state)}
    history = load_history(directory, manifest)
    return DeviceCheckpoint(
        manifest=manifest,
        weights={n: state[n].copy() for n in manifest.params},
        importance={n: decode(state[n + IMPORTANCE_SUFFIX]) for n in manifest.masked},
        history=[
            {n: decode(history[task_key(k, n)]) for n in manifest.masked}
            for k in range(manifest.num_tasks)
        ],
    )
