"""persistence: the importance file (codec, keys, validation) and save/load of whole models."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import (
    ENDS_UNTRAINED,
    UINT8_A_TOL,
    assert_same_importance,
    classification_batches,
    dir_digest,
    linear_model,
    multi_head,
    run_tasks,
    same_state,
    saved_mlp,
    small_mlp,
    snapshot,
    text_batches,
    tiny_bert,
    tiny_gpt2,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from softmask_format.names import CONFIG_NAME, IMPORTANCE_NAME, WEIGHTS_NAME
from torch import nn

import softmask_peft
from softmask_peft import (
    CorruptFileError,
    DASConfig,
    ImportanceMismatchError,
    MissingFileError,
    SaveLocationError,
    SoftMaskConfig,
    SoftMaskModel,
    UnsupportedFormatError,
    WeightsMismatchError,
    get_softmask_model,
)
from softmask_peft.persistence import decode, encode, load_importance, save_importance
from softmask_peft.store import ImportanceStore, TaskRecord

SHAPES = {"a.weight": torch.Size([3, 4]), "a.bias": torch.Size([3])}


def filled_store(num_tasks: int = 2) -> tuple[ImportanceStore, list[dict]]:
    gen = torch.Generator().manual_seed(0)
    tasks = [{n: torch.rand(s, generator=gen) for n, s in SHAPES.items()} for _ in range(num_tasks)]
    records = [TaskRecord(f"t{k}") for k in range(num_tasks)]
    return ImportanceStore.from_parts(tasks, records), tasks


def test_encode_decode_dtypes():
    a = torch.linspace(0, 1, 1001)
    assert torch.equal(decode(encode(a, "float32")), a)
    f16 = decode(encode(a, "float16"))
    assert encode(a, "float16").dtype == torch.float16
    assert float((f16 - a).abs().max()) <= torch.finfo(torch.float16).eps
    u8 = encode(a, "uint8")
    assert u8.dtype == torch.uint8 and int(u8[0]) == 0 and int(u8[-1]) == 255
    assert float((decode(u8) - a).abs().max()) <= UINT8_A_TOL
    assert torch.equal(decode(u8, format_version=2), u8.float() / 255)  # files of format 1-2


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
def test_save_load_round_trip(tmp_path, dtype):
    store, tasks = filled_store()
    path = tmp_path / "imp.safetensors"
    save_importance(path, store, dtype)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        stored_dtypes = {f.get_tensor(k).dtype for k in keys}
    assert meta["format"] == "pt" and meta["softmask_version"]
    assert keys == set(SHAPES) | {f"task.{k}.{n}" for k in range(2) for n in SHAPES}
    assert stored_dtypes == {getattr(torch, dtype)}
    loaded = load_importance(path, SHAPES)
    tol = {"float32": 0.0, "float16": torch.finfo(torch.float16).eps, "uint8": UINT8_A_TOL}[
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
        save_importance(tmp_path / "x.safetensors", store, "int8")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_the_previous_file_and_no_temporaries(tmp_path, monkeypatch):
    store, _ = filled_store()
    path = tmp_path / "imp.safetensors"
    save_importance(path, store, "float32")
    before = dir_digest(tmp_path)
    store._append({n: torch.ones(s) for n, s in SHAPES.items()})

    def half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("softmask_peft.persistence.save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_importance(path, store, "float32")
    assert dir_digest(tmp_path) == before
    assert load_importance(path, SHAPES).num_tasks == 2


def write_raw(path, tensors, **meta):
    metadata = {"format": "pt", "format_version": "1", "num_tasks": "0", "softmask_version": "x"}
    metadata.update(meta)
    save_file(tensors, str(path), metadata=metadata)


def test_load_lists_missing_unexpected_and_wrong_shape_keys(tmp_path):
    path = tmp_path / "imp.safetensors"
    write_raw(path, {"a.weight": torch.zeros(4, 3), "other": torch.zeros(2)})
    with pytest.raises(ImportanceMismatchError) as err:
        load_importance(path, SHAPES)
    msg = str(err.value)
    assert "missing key 'a.bias'" in msg
    assert "unexpected key 'other'" in msg
    assert "a.weight: shape (4, 3)" in msg


def test_load_checks_the_task_history_keys(tmp_path):
    path = tmp_path / "imp.safetensors"
    write_raw(path, {n: torch.zeros(s) for n, s in SHAPES.items()}, num_tasks="1")
    with pytest.raises(ImportanceMismatchError, match="task 0 has no importance"):
        load_importance(path, SHAPES)


@pytest.mark.parametrize("bad", [1.5, -0.25, float("nan")])
def test_load_rejects_values_outside_unit_interval(tmp_path, bad):
    path = tmp_path / "imp.safetensors"
    t = {n: torch.zeros(s) for n, s in SHAPES.items()}
    t["a.bias"][1] = bad
    write_raw(path, t)
    with pytest.raises(ImportanceMismatchError, match=r"a.bias: values outside \[0, 1\]"):
        load_importance(path, SHAPES)


def test_load_rejects_integer_dtype_other_than_uint8(tmp_path):
    path = tmp_path / "imp.safetensors"
    t = {n: torch.zeros(s, dtype=torch.int32) for n, s in SHAPES.items()}
    write_raw(path, t)
    with pytest.raises(ImportanceMismatchError, match="dtype"):
        load_importance(path, SHAPES)


@pytest.mark.parametrize("version", ["1", "2", "3"])
def test_uint8_codes_are_read_by_the_codec_of_the_files_format(tmp_path, version):
    """Formats 1-2 stored round(255 · A); format 3 the keep 2^(−c/16), code 255 for A = 1."""
    codes = torch.tensor([0, 16, 32, 160, 254, 255], dtype=torch.uint8)
    log_keep = [1.0, 0.5, 0.25, 2.0**-10, 2.0 ** (-254 / 16), 0.0]
    expected = {
        "1": [c / 255 for c in codes.tolist()],
        "2": [c / 255 for c in codes.tolist()],
        "3": [1 - k for k in log_keep],
    }[version]
    path = tmp_path / "imp.safetensors"
    shapes = {"w": torch.Size([6])}
    write_raw(path, {"w": codes}, format_version=version, dtype="uint8", tasks="[]")
    loaded = load_importance(path, shapes, tasks=[])
    torch.testing.assert_close(
        loaded.accumulated["w"].double(), torch.tensor(expected, dtype=torch.float64),
        rtol=0, atol=1e-7,
    )
    assert float(loaded.accumulated["w"][0]) == 0.0 and float(loaded.accumulated["w"][-1]) == 1.0


@pytest.mark.parametrize("version", ["6", None])
def test_load_rejects_unknown_format_version(tmp_path, version):
    path = tmp_path / "imp.safetensors"
    meta = {"format": "pt", "num_tasks": "0"}
    if version is not None:
        meta["format_version"] = version
    save_file({n: torch.zeros(s) for n, s in SHAPES.items()}, str(path), metadata=meta)
    with pytest.raises(UnsupportedFormatError, match="format_version"):
        load_importance(path, SHAPES)


def test_load_rejects_truncated_file(tmp_path):
    store, _ = filled_store()
    path = tmp_path / "imp.safetensors"
    save_importance(path, store, "float32")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="imp.safetensors"):
        load_importance(path, SHAPES)


def test_load_rejects_garbage_and_missing_files(tmp_path):
    path = tmp_path / "imp.safetensors"
    path.write_bytes(os.urandom(64))
    with pytest.raises(CorruptFileError):
        load_importance(path, SHAPES)
    with pytest.raises(MissingFileError, match="does not exist"):
        load_importance(tmp_path / "nope.safetensors", SHAPES)


def test_safetensors_metadata_of_a_saved_store_is_readable_by_safetensors(tmp_path):
    store, _ = filled_store(1)
    path = tmp_path / "imp.safetensors"
    save_importance(path, store, "uint8")
    loaded = safetensors.torch.load_file(path)
    assert loaded["a.weight"].dtype == torch.uint8


# whole models ------------------------------------------------------------
# persistence -------------------------------------------------------------------------------


def test_save_writes_the_three_files_and_metadata(tmp_path):
    model, directory = saved_mlp(tmp_path)
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [CONFIG_NAME, IMPORTANCE_NAME, WEIGHTS_NAME]
    )
    with safe_open(directory / IMPORTANCE_NAME, framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "pt" and meta["softmask_version"] == softmask_peft.__version__
    names = set(model.importance)
    assert keys == names | {f"task.{k}.{n}" for k in range(2) for n in names}
    cfg = json.loads((directory / CONFIG_NAME).read_text())
    assert cfg["format_version"] == 5 and cfg["method"] == "spg"  # 5: lora_mask
    assert meta["format_version"] == "5"
    assert json.loads(meta["tasks"]) == [{"name": "task_0", "num_classes": None}, {"name": "task_1", "num_classes": None}]
    assert "task_names" not in cfg


def test_round_trip_is_bit_exact_for_float32(tmp_path):
    model, directory = saved_mlp(tmp_path)
    fresh = small_mlp(seed=99, in_features=6)
    loaded = SoftMaskModel.from_pretrained(fresh, directory)
    assert loaded.base_model is fresh
    assert same_state(snapshot(fresh), snapshot(model.base_model))
    assert_same_importance(model, loaded)
    assert loaded.softmask_config == model.softmask_config
    # the loaded model continues with task 2, masked by the loaded importance
    loaded.begin_task(2)
    flat = torch.cat([a.flatten() for a in model.importance.values()]).double()
    assert loaded.head_keep() == pytest.approx(1 - float(flat.mean()), abs=1e-12)
    group = loaded.keep_masks.groups[0]
    for p, keep, name in zip(group.params, group.keep, model.importance):
        assert p is dict(fresh.named_parameters())[name]
        assert torch.equal(keep, 1 - model.importance[name])


@pytest.mark.parametrize("dtype, tol", [("float16", 2**-10), ("uint8", UINT8_A_TOL)])
def test_round_trip_with_compact_importance_dtypes(tmp_path, dtype, tol):
    model, directory = saved_mlp(tmp_path, dtype)
    with safe_open(directory / IMPORTANCE_NAME, framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in list(f.keys())}
    assert dtypes == {getattr(torch, dtype)}
    loaded = SoftMaskModel.from_pretrained(small_mlp(seed=5, in_features=6), directory)
    assert_same_importance(model, loaded, tol=tol)


def test_multi_head_round_trip_rebuilds_the_heads(tmp_path):
    net = multi_head(in_features=6, feature_dim=5, backbone="mlp")
    model = run_tasks(get_softmask_model(net, SoftMaskConfig()), 3, classes=[2, 3, 4])
    model.save_pretrained(tmp_path)
    fresh = multi_head(in_features=6, feature_dim=5, backbone="mlp", seed=7)
    loaded = SoftMaskModel.from_pretrained(fresh, tmp_path)
    assert [h.out_features for h in fresh.heads] == [2, 3, 4]
    assert same_state(snapshot(fresh), snapshot(net))
    assert_same_importance(model, loaded)
    x = torch.randn(3, 6)
    for t in range(3):
        torch.testing.assert_close(loaded(x, task_id=t), model(x, task_id=t), rtol=0, atol=0)
    loaded.begin_task(3, num_classes=2)  # learning continues with a fourth head
    assert [h.out_features for h in fresh.heads] == [2, 3, 4, 2]
    assert [t.num_classes for t in loaded.task_log] == [2, 3, 4, 2]


def test_hf_bert_round_trip(tmp_path):
    net = tiny_bert()
    cfg = SoftMaskConfig(target_modules=["query", "value"], head_modules=["classifier"])
    model = get_softmask_model(net, cfg)
    model.begin_task(0)
    model.end_task(text_batches())
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    fresh = tiny_bert(seed=3)
    loaded = SoftMaskModel.from_pretrained(fresh, tmp_path)
    assert same_state(snapshot(fresh), snapshot(net))
    assert_same_importance(model, loaded)
    assert loaded.masked_parameter_names == model.masked_parameter_names
    batch = text_batches()[1]
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_gpt2_with_tied_embeddings_round_trip(tmp_path):
    net = tiny_gpt2()
    model = get_softmask_model(net, SoftMaskConfig(exclude_modules=["wpe"]))
    assert "transformer.wpe.weight" not in model.masked_parameter_names
    ids = torch.randint(0, 40, (2, 6))
    model.begin_task(0)
    model.end_task([{"input_ids": ids, "labels": ids}])
    model.save_pretrained(tmp_path)
    fresh = tiny_gpt2(seed=4)
    loaded = SoftMaskModel.from_pretrained(fresh, tmp_path)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight  # tying survives the load
    assert same_state(snapshot(fresh), snapshot(net))
    assert_same_importance(model, loaded)


class BufferViews(nn.Module):
    """A linear layer plus buffers that are views: `row` of the weight, `a` / `b` of one flat storage."""

    def __init__(self, flat_b: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.register_buffer("row", self.fc.weight.data[1])
        flat = torch.arange(20.0)
        self.register_buffer("a", flat[:10] if flat_b else flat[:10].clone())
        if flat_b:
            self.register_buffer("b", flat[10:])

    def forward(self, x):
        return self.fc(x)


def test_a_view_inside_a_saved_weight_loads_with_it(tmp_path):
    net = BufferViews(flat_b=False)
    model = run_tasks(get_softmask_model(net, SoftMaskConfig()), 1, in_features=6)
    model.save_pretrained(tmp_path)
    assert "row" not in load_file(tmp_path / WEIGHTS_NAME)  # safetensors kept fc.weight only
    fresh = BufferViews(flat_b=False)
    SoftMaskModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(fresh.row, net.fc.weight[1]) and torch.equal(fresh.fc.weight, net.fc.weight)


def test_a_tensor_sharing_storage_outside_the_saved_span_is_missing(tmp_path):
    net = BufferViews(flat_b=False)
    run_tasks(get_softmask_model(net, SoftMaskConfig()), 1, in_features=6).save_pretrained(tmp_path)
    refused(BufferViews(flat_b=True), tmp_path, WeightsMismatchError, "1 missing weight.*'b'")


# refused loads: clear error, nothing changed ------------------------------------------------


def refused(fresh: nn.Module, directory, error, match: str) -> None:
    before = snapshot(fresh)
    with pytest.raises(error, match=match):
        SoftMaskModel.from_pretrained(fresh, directory)
    assert same_state(before, snapshot(fresh))


def test_importance_for_another_architecture_is_refused(tmp_path):
    _, directory = saved_mlp(tmp_path)
    refused(small_mlp(in_features=6, hidden=9), directory, WeightsMismatchError, "saved from a SmallMLP.*\n.*fc1.weight")
    refused(linear_model(6), directory, WeightsMismatchError, "unexpected weight.*'fc1.weight'")


def test_importance_that_does_not_fit_the_weights_is_refused(tmp_path):
    # weights fit, but the importance file carries a different shape
    _, directory = saved_mlp(tmp_path)
    tensors = load_file(directory / IMPORTANCE_NAME)
    with safe_open(directory / IMPORTANCE_NAME, framework="pt") as f:
        meta = f.metadata()
    tensors["fc2.bias"] = torch.zeros(7)
    save_file(tensors, str(directory / IMPORTANCE_NAME), metadata=meta)
    refused(small_mlp(seed=1, in_features=6), directory, ImportanceMismatchError, "fc2.bias: shape")


def test_importance_outside_unit_interval_is_refused(tmp_path):
    _, directory = saved_mlp(tmp_path)
    tensors = load_file(directory / IMPORTANCE_NAME)
    with safe_open(directory / IMPORTANCE_NAME, framework="pt") as f:
        meta = f.metadata()
    tensors["task.1.fc1.bias"][0] = 1.5
    save_file(tensors, str(directory / IMPORTANCE_NAME), metadata=meta)
    refused(small_mlp(seed=1, in_features=6), directory, ImportanceMismatchError, "task.1.fc1.bias")


def test_unknown_config_format_version_is_refused(tmp_path):
    _, directory = saved_mlp(tmp_path)
    data = json.loads((directory / CONFIG_NAME).read_text())
    data["format_version"] = 99
    (directory / CONFIG_NAME).write_text(json.dumps(data))
    refused(small_mlp(seed=1, in_features=6), directory, UnsupportedFormatError, "99")


def test_unknown_importance_format_version_is_refused(tmp_path):
    _, directory = saved_mlp(tmp_path)
    tensors = load_file(directory / IMPORTANCE_NAME)
    with safe_open(directory / IMPORTANCE_NAME, framework="pt") as f:
        meta = dict(f.metadata())
    meta["format_version"] = "7"
    save_file(tensors, str(directory / IMPORTANCE_NAME), metadata=meta)
    refused(small_mlp(seed=1, in_features=6), directory, UnsupportedFormatError, "'7'")


@pytest.mark.parametrize("name", [CONFIG_NAME, IMPORTANCE_NAME, WEIGHTS_NAME])
def test_directory_missing_a_file_is_refused(tmp_path, name):
    _, directory = saved_mlp(tmp_path)
    (directory / name).unlink()
    refused(small_mlp(seed=1, in_features=6), directory, MissingFileError, name)


def test_missing_directory_is_refused(tmp_path):
    refused(small_mlp(in_features=6), tmp_path / "nowhere", MissingFileError, "not a directory")


@pytest.mark.parametrize("name", [IMPORTANCE_NAME, WEIGHTS_NAME])
def test_truncated_safetensors_is_refused(tmp_path, name):
    _, directory = saved_mlp(tmp_path)
    data = (directory / name).read_bytes()
    (directory / name).write_bytes(data[: len(data) - 40])
    refused(small_mlp(seed=1, in_features=6), directory, CorruptFileError, name)


def test_refused_load_does_not_add_heads(tmp_path):
    net = multi_head(in_features=6, feature_dim=5)
    model = run_tasks(get_softmask_model(net, SoftMaskConfig()), 2, classes=[2, 3])
    model.save_pretrained(tmp_path)
    data = (tmp_path / IMPORTANCE_NAME).read_bytes()
    (tmp_path / IMPORTANCE_NAME).write_bytes(data[:-40])
    fresh = multi_head(in_features=6, feature_dim=5, seed=1)
    with pytest.raises(CorruptFileError):
        SoftMaskModel.from_pretrained(fresh, tmp_path)
    assert len(fresh.heads) == 0


def test_save_into_a_file_path_is_refused(tmp_path):
    target = tmp_path / "ckpt"
    target.write_text("keep me")
    model = run_tasks(get_softmask_model(small_mlp(in_features=6), SoftMaskConfig()), 1)
    with pytest.raises(SaveLocationError, match="not a directory"):
        model.save_pretrained(target)
    assert target.read_text() == "keep me"


def fail_after_writing(*args, **kwargs):
    filename = args[1] if len(args) > 1 else kwargs["filename"]
    with open(filename, "wb") as f:
        f.write(b"\x00" * 16)
    raise OSError("injected failure mid-save")


@pytest.mark.parametrize("target", ["softmask_peft.persistence.save_file", "safetensors.torch.save_file"])
@ENDS_UNTRAINED
def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch, target):
    model, directory = saved_mlp(tmp_path)
    before = dir_digest(directory)
    run_tasks_from = model.num_tasks
    model.begin_task(run_tasks_from)
    model.end_task(classification_batches(in_features=6))
    with torch.no_grad():
        model.base_model.fc1.weight.add_(1.0)
    monkeypatch.setattr(target, fail_after_writing)
    with pytest.raises(OSError, match="injected"):
        model.save_pretrained(directory)
    monkeypatch.undo()
    assert dir_digest(directory) == before  # byte-identical, and no temporary left behind
    loaded = SoftMaskModel.from_pretrained(small_mlp(seed=3, in_features=6), directory)
    assert loaded.num_tasks == 2


@ENDS_UNTRAINED
def test_saving_twice_overwrites_cleanly(tmp_path):
    model, directory = saved_mlp(tmp_path)
    model.begin_task(2)
    model.end_task(classification_batches(in_features=6))
    model.save_pretrained(directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [CONFIG_NAME, IMPORTANCE_NAME, WEIGHTS_NAME]
    )
    assert SoftMaskModel.from_pretrained(small_mlp(seed=3, in_features=6), directory).num_tasks == 3


@ENDS_UNTRAINED
def test_checkpoint_saved_mid_task_resumes_and_round_trips(tmp_path):
    net = multi_head(in_features=6, feature_dim=5)
    model = run_tasks(get_softmask_model(net, SoftMaskConfig()), 1, classes=[3])
    model.begin_task(1, num_classes=2)  # training of task 1 is under way: checkpoint it
    model.save_pretrained(tmp_path / "mid")
    fresh = multi_head(in_features=6, feature_dim=5, seed=1)
    resumed = SoftMaskModel.from_pretrained(fresh, tmp_path / "mid")
    assert resumed.num_tasks == 1 and len(fresh.heads) == 2
    resumed.begin_task(1, num_classes=2)
    assert resumed.task_log == (TaskRecord("task_0", 3), TaskRecord("task_1", 2))
    resumed.end_task(classification_batches(in_features=6, num_classes=2))
    resumed.save_pretrained(tmp_path / "done")
    again = SoftMaskModel.from_pretrained(
        multi_head(in_features=6, feature_dim=5, seed=2), tmp_path / "done"
    )
    assert again.num_tasks == 2


def test_checkpoint_saved_during_the_first_task_loads(tmp_path):
    net = small_mlp(in_features=6)
    model = get_softmask_model(net, SoftMaskConfig())
    model.begin_task(0)
    with torch.no_grad():
        net.fc1.weight.add_(0.5)  # some training happened
    model.save_pretrained(tmp_path)
    fresh = small_mlp(seed=1, in_features=6)
    loaded = SoftMaskModel.from_pretrained(fresh, tmp_path)
    assert loaded.num_tasks == 0 and loaded.importance == {}
    assert same_state(snapshot(fresh), snapshot(net))

def test_weights_and_importance_from_different_saves_are_refused(tmp_path):
    """Files of two different saves put side by side (e.g. copied by hand) are not paired."""
    model, directory = saved_mlp(tmp_path)
    other = tmp_path / "second"
    model.save_pretrained(other)  # same tensors, another save
    (directory / WEIGHTS_NAME).write_bytes((other / WEIGHTS_NAME).read_bytes())
    fresh = small_mlp(seed=1, in_features=6)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CorruptFileError, match="different saves"):
        SoftMaskModel.from_pretrained(fresh, directory)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())



# files written by 0.1.0 (format 1) -------------------------------------------------------------

V010 = Path(__file__).parent / "fixtures" / "v0_1_0"


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_a_multi_head_checkpoint_written_by_0_1_0_loads(dtype):
    net = multi_head(backbone="mlp", seed=3)
    model = SoftMaskModel.from_pretrained(net, V010 / f"spg_multihead_{dtype}")
    assert model.task_log == (TaskRecord("digits_0", 3), TaskRecord("digits_1", 2))
    assert model.num_tasks == 2 and len(net.heads) == 2 and model.current_task is None
    saved = load_file(V010 / f"spg_multihead_{dtype}" / WEIGHTS_NAME)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved.items())
    raw = load_file(V010 / f"spg_multihead_{dtype}" / IMPORTANCE_NAME)
    scale = 255.0 if dtype == "uint8" else 1.0
    for name, a in model.importance.items():
        assert torch.equal(a, raw[name].to(torch.float32) / scale)
    assert 0 < model.importance["backbone.0.weight"].mean() < 1


def test_a_das_checkpoint_written_by_0_1_0_loads_with_its_options():
    net = tiny_bert(dropout=0.1, seed=4)
    model = SoftMaskModel.from_pretrained(net, V010 / "das_bert")
    assert model.softmask_config.method_config == DASConfig(
        contrastive_weight=1.0, contrastive_positive="grad"  # 0.1.0's behaviour
    )
    assert model.task_log == (TaskRecord("domain_a", None),) and model.store.general is None
    raw = load_file(V010 / "das_bert" / IMPORTANCE_NAME)
    assert all(torch.equal(a, raw[k]) for k, a in model.importance.items())
    assert model.parameter_importance()  # masks the next domain


def test_a_das_checkpoint_keeps_general_importance_saved_before_the_first_domain(tmp_path):
    model = get_softmask_model(tiny_bert(dropout=0.1), SoftMaskConfig(method="das"))
    general = model.general_importance(text_batches(seed=5))
    model.save_pretrained(tmp_path)
    loaded = SoftMaskModel.from_pretrained(tiny_bert(dropout=0.1, seed=9), tmp_path)
    assert loaded.num_tasks == 0 and loaded.importance == {}
    assert sorted(loaded.store.general) == sorted(general)
    assert all(torch.equal(loaded.store.general[k], v) for k, v in general.items())
    assert any(float(v.max()) > 0 for v in loaded.parameter_importance().values())


# a file may only make us allocate what its own bytes justify ---------------------------------


def _rewrite_metadata(path: Path, **changes: str) -> None:
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = {**(f.metadata() or {}), **changes}
    save_file(tensors, str(path), metadata=metadata)


def test_a_huge_head_in_the_task_log_is_refused_before_any_allocation(tmp_path):
    net = multi_head(in_features=6, backbone="mlp")
    model = run_tasks(get_softmask_model(net, SoftMaskConfig()), 2, classes=[3, 2])
    model.save_pretrained(tmp_path)
    tasks = json.dumps([{"name": "a", "num_classes": 3}, {"name": "b", "num_classes": 10**6}])
    _rewrite_metadata(tmp_path / IMPORTANCE_NAME, tasks=tasks)
    fresh = multi_head(in_features=6, backbone="mlp")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(WeightsMismatchError, match=r"heads.1.weight: saved \(2, 5\) != model \(1000000, 5\)"):
        SoftMaskModel.from_pretrained(fresh, tmp_path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 8 * 1024  # the head: 20 MB
    assert len(fresh.heads) == 0


@pytest.mark.parametrize("num_tasks", ["1000000000", "-1", "x"])
def test_an_impossible_task_count_is_refused(tmp_path, num_tasks):
    _, directory = saved_mlp(tmp_path)
    _rewrite_metadata(directory / IMPORTANCE_NAME, num_tasks=num_tasks)
    with pytest.raises(CorruptFileError, match="num_tasks|task"):
        SoftMaskModel.from_pretrained(small_mlp(seed=2, in_features=6), directory)


@pytest.mark.parametrize(
    "tasks", ['[{"name": 1}]', '{"a": 1}', '[{"name": "a", "num_classes": true}]', "[" * 5000]
)
def test_a_malformed_task_log_is_refused(tmp_path, tasks):
    _, directory = saved_mlp(tmp_path)
    _rewrite_metadata(directory / IMPORTANCE_NAME, tasks=tasks)
    with pytest.raises(CorruptFileError, match="task"):
        SoftMaskModel.from_pretrained(small_mlp(seed=2, in_features=6), directory)


def test_importance_stored_in_another_dtype_than_its_metadata_is_refused(tmp_path):
    _, directory = saved_mlp(tmp_path)
    _rewrite_metadata(directory / IMPORTANCE_NAME, dtype="uint8")  # tensors are float32
    with pytest.raises(ImportanceMismatchError, match="metadata says uint8"):
        SoftMaskModel.from_pretrained(small_mlp(seed=2, in_features=6), directory)


@pytest.mark.parametrize("where", ["nul", "file"])
def test_an_unusable_save_location_is_our_error_and_leaves_nothing(tmp_path, where):
    model, _ = saved_mlp(tmp_path)
    before = dir_digest(tmp_path)
    if where == "nul":
        target = str(tmp_path / "a\x00b")
    else:
        target = tmp_path / "plain"
        target.write_text("x")
        before = dir_digest(tmp_path)
    with pytest.raises(SaveLocationError, match="cannot save into"):
        model.save_pretrained(target)
    assert dir_digest(tmp_path) == before
