"""The shared format core: the codec keeps 0.1.0's torch encoding, keys and directory checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from softmask_format import codec
from softmask_format.atomic import ensure_directory
from softmask_format.keys import task_key

from softmask_peft.errors import SaveLocationError
from softmask_peft.persistence import decode, encode

VALUES = torch.linspace(0, 1, 2001)


def test_torch_side_encodes_as_torch_did_in_0_1_0() -> None:
    """The 0.1.0 codec was torch's: round(A * 255) to uint8, the float16 cast; same bits now."""
    assert torch.equal(encode(VALUES, "uint8"), torch.round(VALUES * 255.0).to(torch.uint8))
    assert torch.equal(encode(VALUES, "float16"), VALUES.to(torch.float16))
    assert torch.equal(encode(VALUES, "float32"), VALUES)
    assert torch.equal(decode(encode(VALUES, "uint8")), encode(VALUES, "uint8").float() / 255.0)


def test_uint8_error_is_at_most_half_a_step() -> None:
    a = VALUES.numpy()
    err = np.abs(codec.decode(codec.encode(a, "uint8")) - a)
    assert err.max() <= 1 / 510 + 1e-7


def test_float16_bits_decode_like_float16() -> None:
    a = VALUES.numpy()
    bits = codec.encode(a, "float16", float16_bits=True)
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(codec.decode(bits), a.astype(np.float16).astype(np.float32))


def test_unknown_dtype_names_the_choices() -> None:
    with pytest.raises(ValueError, match="float32.*float16.*uint8.*bfloat16"):
        codec.encode(np.zeros(2, np.float32), "bfloat16")


def test_task_key_scheme() -> None:
    assert task_key(3, "encoder.layer.0.weight") == "task.3.encoder.layer.0.weight"


def test_ensure_directory_raises_the_callers_error(tmp_path) -> None:
    file = tmp_path / "taken"
    file.write_text("x")
    with pytest.raises(SaveLocationError, match="not a directory"):
        ensure_directory(file, SaveLocationError)
    assert ensure_directory(tmp_path / "a" / "b").is_dir()
