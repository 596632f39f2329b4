"""Importance storage dtypes: importance A in [0, 1] on disk as float32, float16 or uint8.

uint8 stores round(A · 255) and decodes to A / 255 (error <= 1/510); float16 is the IEEE-754
half cast. The device checkpoint carries float16 as its bit pattern in a uint16 tensor (ORT 1.19
cannot load float16 checkpoint tensors), so `decode` reads uint16 as float16 bits. The ONNX
decode nodes of `softmask_edge.graphs` are built from the constants below.
"""

from __future__ import annotations

import numpy as np

from .names import IMPORTANCE_DTYPES

__all__ = [
    "IMPORTANCE_DTYPES",
    "check_dtype",
    "decode",
    "encode",
]
UINT8_SCALE = 255.0
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
    """Importance in [0, 1] -> storage dtype; `float16_bits` gives float16 as uint16 bits."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if check_dtype(dtype) == "uint8":
        return np.round(a * np.float32(UINT8_SCALE)).astype(np.uint8)
    if dtype == "float16":
        half = a.astype(np.float16)
        return half.view(np.uint16) if float16_bits else half
    return a


def decode(a: np.ndarray) -> np.ndarray:
    """Storage dtype -> float32 importance (uint8: A / 255; uint16: float16 bits)."""
    a = np.asarray(a)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(UINT8_SCALE)
    if a.dtype == np.uint16:
        return a.view(np.float16).astype(np.float32)
    return a.astype(np.float32)
