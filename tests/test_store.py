"""ImportanceStore: max-accumulation, history, safetensors encoding and validated loading (§6)."""

from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch
from helpers import dir_digest
from safetensors import safe_open
from safetensors.torch import save_file

from softmask_peft import (
    CorruptFileError,
    ImportanceMismatchError,
    MissingFileError,
    UnsupportedFormatError,
)
from softmask_peft.store import ImportanceStore, decode, encode

SHAPES = {"a.weight": torch.Size([3, 4]), "a.bias": torch.Size([3])}


def filled_store(num_tasks: int = 2) -> tuple[ImportanceStore, list[dict]]:
    gen = torch.Generator().manual_seed(0)
    tasks = [{n: torch.rand(s, generator=gen) for n, s in SHAPES.items()} for _ in range(num_tasks)]
    store = ImportanceStore()
    for t in tasks:
        store.add_task(t)
    return store, tasks


def test_add_task_max_accumulates_and_keeps_history():
    store = ImportanceStore()
    t0 = {"w": torch.tensor([0.1, 0.9, 0.5])}
    t1 = {"w": torch.tensor([0.4, 0.2, 0.5])}
    store.add_task(t0)
    store.add_task(t1)
    assert torch.equal(store.accumulated["w"], torch.tensor([0.4, 0.9, 0.5]))
    assert store.num_tasks == 2
    assert torch.equal(store.history[0]["w"], torch.tensor([0.1, 0.9, 0.5]))
    t0["w"].fill_(1.0)  # the store holds copies
    assert torch.equal(store.history[0]["w"], torch.tensor([0.1, 0.9, 0.5]))
    assert store.accumulated["w"] is not store.history[1]["w"]


def test_encode_decode_dtypes():
    a = torch.linspace(0, 1, 1001)
    assert torch.equal(decode(encode(a, "float32")), a)
    f16 = decode(encode(a, "float16"))
    assert encode(a, "float16").dtype == torch.float16
    assert float((f16 - a).abs().max()) <= torch.finfo(torch.float16).eps
    u8 = encode(a, "uint8")
    assert u8.dtype == torch.uint8 and int(u8[0]) == 0 and int(u8[-1]) == 255
    assert float((decode(u8) - a).abs().max()) <= 1 / 510 + 1e-7


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
def test_save_load_round_trip(tmp_path, dtype):
    store, tasks = filled_store()
    path = tmp_path / "imp.safetensors"
    store.save(path, dtype)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        stored_dtypes = {f.get_tensor(k).dtype for k in keys}
    assert meta["format"] == "pt" and meta["softmask_version"]
    assert keys == set(SHAPES) | {f"task.{k}.{n}" for k in range(2) for n in SHAPES}
    assert stored_dtypes == {getattr(torch, dtype)}
    loaded = ImportanceStore.load(path, SHAPES)
    tol = {"float32": 0.0, "float16": torch.finfo(torch.float16).eps, "uint8": 1 / 510 + 1e-7}[
        dtype
    ]
    assert loaded.num_tasks == 2
    for n in SHAPES:
        acc = torch.maximum(tasks[0][n], tasks[1][n])
        assert loaded.accumulated[n].dtype == torch.float32
        assert float((loaded.accumulated[n] - acc).abs().max()) <= tol
        for k in range(2):
            assert float((loaded.history[k][n] - tasks[k][n]).abs().max()) <= tol
    if dtype == "float32":
        assert all(torch.equal(loaded.accumulated[n], store.accumulated[n]) for n in SHAPES)


def test_save_rejects_unknown_dtype(tmp_path):
    store, _ = filled_store()
    with pytest.raises(ValueError, match="dtype"):
        store.save(tmp_path / "x.safetensors", "int8")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_the_previous_file_and_no_temporaries(tmp_path, monkeypatch):
    store, _ = filled_store()
    path = tmp_path / "imp.safetensors"
    store.save(path, "float32")
    before = dir_digest(tmp_path)
    store.add_task({n: torch.ones(s) for n, s in SHAPES.items()})

    def half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("softmask_peft.store.save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        store.save(path, "float32")
    assert dir_digest(tmp_path) == before
    assert ImportanceStore.load(path, SHAPES).num_tasks == 2


def write_raw(path, tensors, **meta):
    metadata = {"format": "pt", "format_version": "1", "num_tasks": "0", "softmask_version": "x"}
    metadata.update(meta)
    save_file(tensors, str(path), metadata=metadata)


def test_load_lists_missing_unexpected_and_wrong_shape_keys(tmp_path):
    path = tmp_path / "imp.safetensors"
    write_raw(path, {"a.weight": torch.zeros(4, 3), "other": torch.zeros(2)})
    with pytest.raises(ImportanceMismatchError) as err:
        ImportanceStore.load(path, SHAPES)
    msg = str(err.value)
    assert "missing key 'a.bias'" in msg
    assert "unexpected key 'other'" in msg
    assert "a.weight: shape (4, 3)" in msg


def test_load_checks_the_task_history_keys(tmp_path):
    path = tmp_path / "imp.safetensors"
    write_raw(path, {n: torch.zeros(s) for n, s in SHAPES.items()}, num_tasks="1")
    with pytest.raises(ImportanceMismatchError, match="task 0 has no importance"):
        ImportanceStore.load(path, SHAPES)


@pytest.mark.parametrize("bad", [1.5, -0.25, float("nan")])
def test_load_rejects_values_outside_unit_interval(tmp_path, bad):
    path = tmp_path / "imp.safetensors"
    t = {n: torch.zeros(s) for n, s in SHAPES.items()}
    t["a.bias"][1] = bad
    write_raw(path, t)
    with pytest.raises(ImportanceMismatchError, match=r"a.bias: values outside \[0, 1\]"):
        ImportanceStore.load(path, SHAPES)


def test_load_rejects_integer_dtype_other_than_uint8(tmp_path):
    path = tmp_path / "imp.safetensors"
    t = {n: torch.zeros(s, dtype=torch.int32) for n, s in SHAPES.items()}
    write_raw(path, t)
    with pytest.raises(ImportanceMismatchError, match="dtype"):
        ImportanceStore.load(path, SHAPES)


@pytest.mark.parametrize("version", ["2", None])
def test_load_rejects_unknown_format_version(tmp_path, version):
    path = tmp_path / "imp.safetensors"
    meta = {"format": "pt", "num_tasks": "0"}
    if version is not None:
        meta["format_version"] = version
    save_file({n: torch.zeros(s) for n, s in SHAPES.items()}, str(path), metadata=meta)
    with pytest.raises(UnsupportedFormatError, match="format_version"):
        ImportanceStore.load(path, SHAPES)


def test_load_rejects_truncated_file(tmp_path):
    store, _ = filled_store()
    path = tmp_path / "imp.safetensors"
    store.save(path, "float32")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="imp.safetensors"):
        ImportanceStore.load(path, SHAPES)


def test_load_rejects_garbage_and_missing_files(tmp_path):
    path = tmp_path / "imp.safetensors"
    path.write_bytes(os.urandom(64))
    with pytest.raises(CorruptFileError):
        ImportanceStore.load(path, SHAPES)
    with pytest.raises(MissingFileError, match="does not exist"):
        ImportanceStore.load(tmp_path / "nope.safetensors", SHAPES)


def test_safetensors_metadata_of_a_saved_store_is_readable_by_safetensors(tmp_path):
    store, _ = filled_store(1)
    path = tmp_path / "imp.safetensors"
    store.save(path, "uint8")
    loaded = safetensors.torch.load_file(path)
    assert loaded["a.weight"].dtype == torch.uint8
