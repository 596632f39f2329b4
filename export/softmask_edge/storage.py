"""Importance storage dtypes and the per-task history file (numpy only, never pickled).

Encoding matches softmask_peft.store: float16 cast (kept as its uint16 bit pattern on the
device), uint8 = round(A · 255); decoding uint8 is A / 255. The on-device update itself runs in the importance-update graph; these helpers only
convert at export and when the server reads a device checkpoint back.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ._atomic import atomic_write
from .errors import CorruptArtifactError

# checkpoint dtype of each storage dtype: float16 travels as its bit pattern (uint16), since
# ORT 1.19 cannot load float16 checkpoint tensors
NUMPY_DTYPES = {"float32": np.float32, "float16": np.uint16, "uint8": np.uint8}


def encode(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 importance in [0, 1] -> storage dtype."""
    a = np.asarray(a, np.float32)
    if dtype == "uint8":
        return np.round(a * np.float32(255.0)).astype(np.uint8)
    if dtype == "float16":
        return a.astype(np.float16).view(np.uint16)
    return a


def decode(a: np.ndarray) -> np.ndarray:
    """Storage dtype -> float32 importance."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255.0)
    if a.dtype == np.uint16:
        return a.view(np.float16).astype(np.float32)
    return a.astype(np.float32)


def write_history(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    """Write `{task.{k}.{name}: array}` as an uncompressed .npz, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.ascontiguousarray(v) for k, v in tensors.items()})

    atomic_write(path, write)


def read_history(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a history file (object arrays refused: allow_pickle=False)."""
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CorruptArtifactError(f"cannot read importance history {str(path)!r}: {e}") from e
