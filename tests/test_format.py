"""The shared format core: the codec (old files still decode), keys, directory checks, writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from softmask_format import codec
from softmask_format.atomic import atomic_write_text, ensure_directory
from softmask_format.keys import task_key

from softmask_peft.errors import SaveLocationError
from softmask_peft.persistence import decode, encode

VALUES = torch.linspace(0, 1, 2001)


def test_torch_side_encodes_with_the_shared_codec() -> None:
    """float16 is torch's cast as in 0.1.0; uint8 the numpy codec's log-keep code."""
    assert torch.equal(encode(VALUES, "float16"), VALUES.to(torch.float16))
    assert torch.equal(encode(VALUES, "float32"), VALUES)
    u8 = encode(VALUES, "uint8")
    assert torch.equal(u8, torch.from_numpy(codec.encode(VALUES.numpy(), "uint8")))
    assert torch.equal(decode(u8), torch.from_numpy(codec.decode(u8.numpy())))


def test_linear_uint8_of_formats_1_and_2_still_decodes() -> None:
    """0.1.0 wrote round(A * 255); those files decode to c / 255, torch and numpy alike."""
    old = torch.round(VALUES * 255.0).to(torch.uint8)
    assert torch.equal(decode(old, format_version=1), old.float() / 255.0)
    assert torch.equal(decode(old, format_version=2), old.float() / 255.0)
    np.testing.assert_array_equal(
        codec.decode(old.numpy(), linear_uint8=True), old.numpy().astype(np.float32) / 255.0
    )


def test_uint8_keeps_the_keep_factor_within_a_32nd_octave() -> None:
    """keep = 1 − A within 2^(1/32) − 1 relative (plus 2^-23, float32's resolution of A near
    1) down to 2^-15.9; A = 0 and A = 1 exact."""
    rng = np.random.default_rng(0)
    keep = np.concatenate([2.0 ** -rng.uniform(0, 15.9, 20000), [1.0, 0.5, 2.0**-10]])
    a = (1.0 - keep).astype(np.float32)
    kept = 1.0 - codec.decode(codec.encode(a, "uint8")).astype(np.float64)
    true = 1.0 - a.astype(np.float64)
    assert bool(np.all(np.abs(kept - true) <= (2 ** (1 / 32) - 1) * true + 2.0**-23))
    assert np.max(np.abs(kept - true) / true) > 0.02  # the bound is tight: 1/64 octave
    ends = np.array([0.0, 1.0, 1 - 2.0**-17], np.float32)
    np.testing.assert_array_equal(codec.decode(codec.encode(ends, "uint8")), [0.0, 1.0, 1.0])
    assert codec.encode(np.float32(0.5), "uint8") == 16  # keep 2^-1: 16 steps of 1/16 octave


def test_every_uint8_code_decodes_and_re_encodes_to_itself() -> None:
    """Repeated save / load never drifts: decode is monotone and encode inverts it."""
    codes = np.arange(256, dtype=np.uint8)
    a = codec.decode(codes)
    assert a[0] == 0.0 and a[255] == 1.0 and bool(np.all(np.diff(a) > 0))
    np.testing.assert_array_equal(codec.encode(a, "uint8"), codes)


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


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_mode_open_would_give(tmp_path, umask) -> None:
    """Not mkstemp's 0600: a web server serving an artifacts folder must read the manifest."""
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "manifest.json", "{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == 0o666 & ~umask
