"""Accumulated importance and its per-task history; safetensors I/O (DESIGN §6).

Keys: the accumulated importance under its own name (a parameter's full name for SPG, a unit
tensor name for DAS) and each task's importance under `task.{k}.{name}`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ._atomic import atomic_write
from .constants import FORMAT_VERSION, IMPORTANCE_DTYPES
from .errors import (
    CorruptFileError,
    ImportanceMismatchError,
    MissingFileError,
    UnsupportedFormatError,
)

TASK_PREFIX = "task."


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("softmask-peft")
    except PackageNotFoundError:
        return "0+unknown"


def encode(a: Tensor, dtype: str) -> Tensor:
    """Importance in [0, 1] -> storage dtype. uint8 is round(A * 255)."""
    a = a.detach().to("cpu", torch.float32).contiguous()
    if dtype == "float32":
        return a
    if dtype == "float16":
        return a.to(torch.float16)
    return torch.round(a * 255.0).to(torch.uint8)


def decode(a: Tensor) -> Tensor:
    """Storage dtype -> float32 importance. uint8 is A / 255."""
    if a.dtype == torch.uint8:
        return a.to(torch.float32) / 255.0
    return a.to(torch.float32)


class ImportanceStore:
    """Accumulated importance `A` and the per-task importance history.

    `A^t = max(A^{t-1}, γ^t)` elementwise, with `A^{-1} = 0` (Konishi et al. 2023, eq. 6).
    """

    def __init__(self) -> None:
        self.accumulated: dict[str, Tensor] = {}
        self.history: list[dict[str, Tensor]] = []
        self.save_id = ""

    @property
    def num_tasks(self) -> int:
        return len(self.history)

    def add_task(self, importance: Mapping[str, Tensor]) -> None:
        """Record one task's importance and max-accumulate it."""
        task = {k: v.detach().to(torch.float32).clone() for k, v in importance.items()}
        for name, value in task.items():
            old = self.accumulated.get(name)
            self.accumulated[name] = value.clone() if old is None else torch.maximum(old, value)
        self.history.append(task)

    def to_tensors(self, dtype: str) -> dict[str, Tensor]:
        """Flat `{name: A, task.{k}.{name}: γ^k}` dict in the storage dtype."""
        if dtype not in IMPORTANCE_DTYPES:
            raise ValueError(f"dtype must be one of {IMPORTANCE_DTYPES}, got {dtype!r}")
        out = {name: encode(v, dtype) for name, v in self.accumulated.items()}
        for k, task in enumerate(self.history):
            out.update({f"{TASK_PREFIX}{k}.{name}": encode(v, dtype) for name, v in task.items()})
        return out

    def save(self, path: str | os.PathLike, dtype: str, save_id: str = "") -> None:
        """Write the store as safetensors atomically; `save_id` ties it to the weights saved with it."""
        tensors = self.to_tensors(dtype)
        metadata = {
            "format": "pt",
            "softmask_version": _version(),
            "format_version": str(FORMAT_VERSION),
            "num_tasks": str(self.num_tasks),
            "dtype": dtype,
            "save_id": save_id,
        }
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike, expected: Mapping[str, torch.Size]) -> ImportanceStore:
        """Read and validate a saved store; raise before building anything if it does not fit.

        `expected` maps every accumulated-importance name to its shape. Every problem
        (missing or unexpected key, shape, value outside [0, 1]) is listed in one error.
        """
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"importance file {str(path)!r} does not exist")
        try:
            tensors = load_file(path)
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CorruptFileError(f"cannot read importance file {str(path)!r}: {e}") from e
        version = metadata.get("format_version")
        if version != str(FORMAT_VERSION):
            raise UnsupportedFormatError(
                f"{path.name}: importance format_version {version!r} is not supported "
                f"(this release reads {FORMAT_VERSION!r})"
            )
        try:
            num_tasks = int(metadata.get("num_tasks", ""))
        except ValueError as e:
            raise CorruptFileError(f"{path.name}: metadata num_tasks is missing or invalid") from e
        # a store saved before its first task ends has no accumulated importance yet
        has_accumulated = num_tasks > 0 or any(n in tensors for n in expected)
        names = [""] * has_accumulated + [f"{TASK_PREFIX}{k}." for k in range(num_tasks)]
        wanted = {p + n: s for p in names for n, s in expected.items()}
        # a task may cover a subset (it trained its own PEFT adapter), never nothing
        absent = sorted(set(wanted) - set(tensors))
        problems = [f"missing key {k!r}" for k in absent if not k.startswith(TASK_PREFIX)]
        problems += [
            f"task {k} has no importance"
            for k in range(num_tasks)
            if not any(f"{TASK_PREFIX}{k}.{n}" in tensors for n in expected)
        ]
        problems += [f"unexpected key {k!r}" for k in sorted(set(tensors) - set(wanted))]
        for key in sorted(set(wanted) & set(tensors)):
            t = tensors[key]
            if tuple(t.shape) != tuple(wanted[key]):
                problems.append(f"{key}: shape {tuple(t.shape)} != expected {tuple(wanted[key])}")
                continue
            if t.dtype not in (torch.float32, torch.float16, torch.uint8):
                problems.append(f"{key}: dtype {t.dtype} is not float32, float16 or uint8")
                continue
            v = decode(t)
            if not bool(torch.isfinite(v).all()) or (v.numel() and (v.min() < 0 or v.max() > 1)):
                problems.append(f"{key}: values outside [0, 1]")
        if problems:
            raise ImportanceMismatchError(
                f"cannot load importance from {str(path)!r}:\n  " + "\n  ".join(problems)
            )
        store = cls()
        store.save_id = metadata.get("save_id", "")
        store.accumulated = {n: decode(tensors[n]) for n in expected} if has_accumulated else {}
        store.history = [
            {
                n: decode(tensors[f"{TASK_PREFIX}{k}.{n}"])
                for n in expected
                if f"{TASK_PREFIX}{k}.{n}" in tensors
            }
            for k in range(num_tasks)
        ]
        return store
