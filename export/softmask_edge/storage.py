"""Importance storage dtypes and the per-task history file (numpy only, never pickled).

The codec is `softmask_format.codec`, shared with softmask_peft; on the device float16 travels
as its uint16 bit pattern. The on-device update itself runs in the importance-update graph;
these helpers only convert at export and when the server reads a device checkpoint back.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from softmask_format import codec
from softmask_format.atomic import atomic_write
from softmask_format.codec import decode

from .errors import CorruptArtifactError

# checkpoint dtype of each storage dtype: float16 travels as its bit pattern (uint16), since
# ORT 1.19 cannot load float16 checkpoint tensors
NUMPY_DTYPES = {"float32": np.float32, "float16": np.uint16, "uint8": np.uint8}


__all__ = ["NUMPY_DTYPES", "decode", "encode", "read_history", "save_arrays", "write_history"]


def encode(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 importance in [0, 1] -> device storage dtype (float16 as its uint16 bits)."""
    return codec.encode(a, dtype, float16_bits=True)


def write_history(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    """Write `{task.{k}.{name}: array}` (or any named arrays: the ExecuTorch checkpoint) as an
    uncompressed .npz, atomically."""
    atomic_write(path, lambda tmp: save_arrays(tmp, tensors))


def save_arrays(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    """Named arrays into a new uncompressed .npz at `path` (not atomic: callers wrap it)."""
    with open(path, "wb") as f:
        np.savez(f, **{k: np.ascontiguousarray(v) for k, v in tensors.items()})


def read_history(path: str | os.PathLike, what: str = "importance history") -> dict[str, np.ndarray]:
    """Read a history file, or another .npz of named arrays (object arrays refused).

    Only stored (uncompressed) members are accepted, so the arrays can never take more memory
    than the file's own bytes (no zip bomb).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            packed = [
                i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED
            ]
        if packed:
            raise CorruptArtifactError(
                f"{what} {str(path)!r}: compressed members {packed[:3]} "
                "(softmask_edge writes uncompressed .npz files)"
            )
        with np.load(Path(path), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    # zipfile refuses members it cannot read (encrypted, patched, a newer zip version) with
    # RuntimeError or its subclass NotImplementedError: a damaged header can set those bits
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, RuntimeError) as e:
        raise CorruptArtifactError(f"cannot read {what} {str(path)!r}: {e}") from e
