"""Importance storage dtypes: importance A in [0, 1] on disk as float32, float16 or uint8.

uint8 (format 3) stores the keep factor k = 1 − A, which scales every masked update, on a log
grid of 1/16 octave: code c holds k = 2^(−c/16) for c = 0..254 (c = 0: A = 0 exactly) and
c = 255 holds k = 0 (A = 1 exactly). Every keep in [2^-15.9, 1] is kept within 2.2 %
(2^(1/32) − 1) of its value, where the linear code of 0.1.0 / format 1-2 (round(255 · A),
decoded as c / 255, `decode(..., linear_uint8=True)`) rounds every keep below 1/510 to 0 and
keeps 0.01 only within ±18 %. A code is found by comparing A with the 255 float32 boundaries
between neighbouring grid values (midpoints in log k), so a decoded value re-encodes to its
own code and numpy and the ONNX nodes of `softmask_edge.graphs` agree bit for bit: both read
the same tables `UINT8_DECODE_TABLE` and `UINT8_BOUNDARIES`.

float16 is the IEEE-754 half cast. The device checkpoint carries float16 as its bit pattern
in a uint16 tensor (ORT 1.19 cannot load float16 checkpoint tensors), so `decode` reads uint16
as float16 bits.
"""

from __future__ import annotations

import numpy as np

from .contract import CONTRACT
from .names import IMPORTANCE_DTYPES

__all__ = [
    "IMPORTANCE_DTYPES",
    "check_dtype",
    "decode",
    "encode",
]
_UINT8 = CONTRACT["importance_dtypes"]["uint8"]
UINT8_STEPS_PER_OCTAVE: int = _UINT8["steps_per_octave"]  # keep resolution: 2^(1/16) per code
UINT8_ZERO_KEEP: int = _UINT8["zero_keep_code"]  # the code of A = 1 (keep 0)
LINEAR_UINT8_SCALE = 255.0  # format 1-2 files: A = c / 255


def _keep(code: np.ndarray) -> np.ndarray:
    return np.exp2(-np.asarray(code, np.float64) / UINT8_STEPS_PER_OCTAVE)


_CODES = np.arange(UINT8_ZERO_KEEP)
# A of every code, rounded once to float32 (index: the code)
UINT8_DECODE_TABLE = np.append(1.0 - _keep(_CODES), 1.0).astype(np.float32)
# UINT8_BOUNDARIES[j] = smallest A stored as code j + 1: the float32 of 1 − 2^(−(j + 1/2)/16)
UINT8_BOUNDARIES = (1.0 - _keep(_CODES + 0.5)).astype(np.float32)
FLOAT16_MANTISSA_BITS = 10
FLOAT16_EXPONENT_BIAS = 15
FLOAT16_MIN_NORMAL = 2.0 ** (1 - FLOAT16_EXPONENT_BIAS)  # 2^-14
FLOAT16_SUBNORMAL_UNIT = 2.0 ** (1 - FLOAT16_EXPONENT_BIAS - FLOAT16_MANTISSA_BITS)  # 2^-24


def check_dtype(dtype: str) -> str:
    """`dtype` if it is a storage dtype; ValueError naming the choices otherwise."""
    if dtype not in IMPORTANCE_DTYPES:
        raise ValueError(f"importance dtype must be one of {IMPORTANCE_DTYPES}, got {dtype!r}")
    return dtype


def encode(a: np.ndarray, dtype: str, *, float16_bits: bool = False) -> np.ndarray:
    """Importance in [0, 1] -> storage dtype; `float16_bits` gives float16 as uint16 bits.

    uint8: c = #{j : A ≥ UINT8_BOUNDARIES[j]}, i.e. round(−16 · log2(1 − A)) capped at 255.
    """
    a = np.asarray(a, dtype=np.float32, order="C")  # not ascontiguousarray: it makes 0-d 1-d
    if check_dtype(dtype) == "uint8":
        return np.asarray(np.searchsorted(UINT8_BOUNDARIES, a, side="right"), np.uint8)
    if dtype == "float16":
        half = a.astype(np.float16)
        return half.view(np.uint16) if float16_bits else half
    return a


def decode(a: np.ndarray, *, linear_uint8: bool = False) -> np.ndarray:
    """Storage dtype -> float32 importance (uint16: float16 bits).

    uint8: A = 1 − 2^(−c/16), 255 -> 1; `linear_uint8` reads a format 1-2 file's c / 255.
    """
    a = np.asarray(a)
    if a.dtype == np.uint8:  # np.asarray: numpy turns a 0-d result into a scalar
        if linear_uint8:
            return np.asarray(a.astype(np.float32) / np.float32(LINEAR_UINT8_SCALE))
        return np.asarray(UINT8_DECODE_TABLE[a])
    if a.dtype == np.uint16:
        return a.view(np.float16).astype(np.float32)
    return a.astype(np.float32)
