"""SoftMaskModel: wrapping, task lifecycle, and persistence (DESIGN §6)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    classification_batches,
    dir_digest,
    linear_model,
    multi_head,
    same_state,
    small_mlp,
    snapshot,
    text_batches,
    tiny_bert,
    tiny_gpt2,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from softmask_format import atomic as _atomic
from softmask_format.atomic import COMMIT_MARKER, STAGING_PREFIX
from torch import nn

from softmask_peft import (
    CorruptFileError,
    ImportanceMismatchError,
    MissingFileError,
    SaveLocationError,
    SoftMaskConfig,
    SoftMaskModel,
    SoftMaskOptimizer,
    TaskOrderError,
    UnsupportedFormatError,
    get_softmask_model,
)
from softmask_peft.constants import CONFIG_NAME, IMPORTANCE_NAME, WEIGHTS_NAME


def run_tasks(model: SoftMaskModel, num_tasks: int, classes=None, in_features: int = 6):
    """Train each task a few SGD steps, then record its importance."""
    for t in range(num_tasks):
        n = classes[t] if classes else 3
        batches = classification_batches(n=12, in_features=in_features, num_classes=n, seed=20 + t)
        model.begin_task(t, num_classes=n if classes else None)
        opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        model.end_task(batches)
    return model


def assert_same_importance(a: SoftMaskModel, b: SoftMaskModel, tol: float = 0.0) -> None:
    assert a.num_tasks == b.num_tasks
    assert sorted(a.importance) == sorted(b.importance)
    pairs = [(a.importance, b.importance)] + [
        (a.task_importance(k), b.task_importance(k)) for k in range(a.num_tasks)
    ]
    for x, y in pairs:
        for k in x:
            if tol == 0.0:
                assert torch.equal(x[k], y[k]), k
            else:
                assert float((x[k] - y[k]).abs().max()) <= tol, k


# wrapping --------------------------------------------------------------------------------


def test_wrapper_delegates_forward_and_attributes():
    net = small_mlp(in_features=6).eval()
    model = get_softmask_model(net, SoftMaskConfig())
    assert model.base_model is net
    x = torch.randn(2, 6)
    torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)
    assert model.fc1 is net.fc1
    assert isinstance(model.softmask_config, SoftMaskConfig)
    with pytest.raises(AttributeError):
        _ = model.does_not_exist
    assert {n for n, _ in model.named_parameters()} == {
        f"base_model.{n}" for n, _ in net.named_parameters()
    }


def test_wrapper_rejects_wrong_types():
    with pytest.raises(TypeError, match="nn.Module"):
        SoftMaskModel("not a model", SoftMaskConfig())
    with pytest.raises(TypeError, match="SoftMaskConfig"):
        SoftMaskModel(nn.Linear(2, 2), {"method": "spg"})


def test_hf_model_config_falls_through():
    net = tiny_bert()
    model = get_softmask_model(net, SoftMaskConfig(head_modules=["classifier"]))
    assert model.config is net.config
    batch = text_batches()[0]
    out = model(**batch)
    assert out.loss is not None and out.logits.shape == (4, 3)


def test_task_order_is_enforced():
    model = get_softmask_model(linear_model(6), SoftMaskConfig())
    with pytest.raises(TaskOrderError, match="end_task"):
        model.end_task(classification_batches(in_features=6))
    with pytest.raises(TaskOrderError, match="the next task is 0"):
        model.begin_task(1)
    model.begin_task(0)
    model.end_task(classification_batches(in_features=6))
    with pytest.raises(TaskOrderError, match="end_task"):
        model.end_task(classification_batches(in_features=6))
    with pytest.raises(TaskOrderError, match="the next task is 1"):
        model.begin_task(0)
    with pytest.raises(TaskOrderError, match="no importance for task 1"):
        model.task_importance(1)


def test_importance_keys_are_the_base_models_parameter_names():
    net = small_mlp(in_features=6)
    model = run_tasks(get_softmask_model(net, SoftMaskConfig()), 2)
    assert list(model.importance) == [n for n, _ in net.named_parameters()]
    assert model.masked_parameter_names == list(model.importance)
    pi = model.parameter_importance()
    assert all(torch.equal(pi[k], model.importance[k]) for k in pi)
    for k, p in net.named_parameters():
        a = model.importance[k]
        assert a.shape == p.shape and a.dtype == torch.float32
        assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_importance_keys_on_bert_with_targets():
    net = tiny_bert()
    model = get_softmask_model(
        net, SoftMaskConfig(target_modules=["query", "value"], head_modules=["classifier"])
    )
    model.begin_task(0)
    model.end_task(text_batches())
    names = [n for n, _ in net.named_parameters()]
    assert all(k in names for k in model.importance)
    assert len(model.importance) == 8
    assert all((".query." in k or ".value." in k) for k in model.importance)


# persistence -------------------------------------------------------------------------------


def saved_mlp(tmp_path, dtype: str = "float32"):
    net = small_mlp(in_features=6)
    model = run_tasks(get_softmask_model(net, SoftMaskConfig(importance_dtype=dtype)), 2)
    directory = tmp_path / "ckpt"
    model.save_pretrained(directory)
    return model, directory


def test_save_writes_the_three_files_and_metadata(tmp_path):
    model, directory = saved_mlp(tmp_path)
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [CONFIG_NAME, IMPORTANCE_NAME, WEIGHTS_NAME]
    )
    with safe_open(directory / IMPORTANCE_NAME, framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "pt" and meta["softmask_version"] == "0.1.0"
    names = set(model.importance)
    assert keys == names | {f"task.{k}.{n}" for k in range(2) for n in names}
    cfg = json.loads((directory / CONFIG_NAME).read_text())
    assert cfg["format_version"] == 1 and cfg["method"] == "spg"
    assert cfg["task_names"] == ["task_0", "task_1"]


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


@pytest.mark.parametrize("dtype, tol", [("float16", 2**-10), ("uint8", 1 / 510 + 1e-7)])
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
    assert loaded.softmask_config.task_num_classes == [2, 3, 4, 2]


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
    refused(BufferViews(flat_b=True), tmp_path, ImportanceMismatchError, "missing weight 'b'")


# refused loads: clear error, nothing changed ------------------------------------------------


def refused(fresh: nn.Module, directory, error, match: str) -> None:
    before = snapshot(fresh)
    with pytest.raises(error, match=match):
        SoftMaskModel.from_pretrained(fresh, directory)
    assert same_state(before, snapshot(fresh))


def test_importance_for_another_architecture_is_refused(tmp_path):
    _, directory = saved_mlp(tmp_path)
    refused(small_mlp(in_features=6, hidden=9), directory, ImportanceMismatchError, "fc1.weight")
    refused(linear_model(6), directory, ImportanceMismatchError, "unexpected weight 'fc1.weight'")


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


@pytest.mark.parametrize("target", ["softmask_peft.store.save_file", "safetensors.torch.save_file"])
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


def test_saving_twice_overwrites_cleanly(tmp_path):
    model, directory = saved_mlp(tmp_path)
    model.begin_task(2)
    model.end_task(classification_batches(in_features=6))
    model.save_pretrained(directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [CONFIG_NAME, IMPORTANCE_NAME, WEIGHTS_NAME]
    )
    assert SoftMaskModel.from_pretrained(small_mlp(seed=3, in_features=6), directory).num_tasks == 3


def test_checkpoint_saved_mid_task_resumes_and_round_trips(tmp_path):
    net = multi_head(in_features=6, feature_dim=5)
    model = run_tasks(get_softmask_model(net, SoftMaskConfig()), 1, classes=[3])
    model.begin_task(1, num_classes=2)  # training of task 1 is under way: checkpoint it
    model.save_pretrained(tmp_path / "mid")
    fresh = multi_head(in_features=6, feature_dim=5, seed=1)
    resumed = SoftMaskModel.from_pretrained(fresh, tmp_path / "mid")
    assert resumed.num_tasks == 1 and len(fresh.heads) == 2
    resumed.begin_task(1, num_classes=2)
    assert resumed.softmask_config.task_names == ["task_0", "task_1"]
    assert resumed.softmask_config.task_num_classes == [3, 2]
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


def test_attribute_lookup_on_an_uninitialised_wrapper_does_not_recurse():
    bare = SoftMaskModel.__new__(SoftMaskModel)
    with pytest.raises(AttributeError):
        _ = bare.config


class Crash(BaseException):
    """Stands for the process dying: nothing after it runs, no cleanup handler catches it."""


@pytest.mark.parametrize("renames_before_crash", [0, 1, 2])  # three files
def test_crash_between_the_renames_is_rolled_forward_by_the_next_load(
    tmp_path, monkeypatch, renames_before_crash
):
    model, directory = saved_mlp(tmp_path)
    model.begin_task(2)
    model.end_task(classification_batches(in_features=6))
    with torch.no_grad():
        model.base_model.fc1.weight.add_(1.0)
    expected = snapshot(model.base_model)
    real_replace, moved = os.replace, []

    def crash_midway(src, dst):
        if Path(dst).parent == directory:  # a rename into place, after the commit point
            if len(moved) == renames_before_crash:
                raise Crash
            moved.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_midway)
    with pytest.raises(Crash):
        model.save_pretrained(directory)
    monkeypatch.undo()
    fresh = small_mlp(seed=3, in_features=6)
    loaded = SoftMaskModel.from_pretrained(fresh, directory)
    assert loaded.num_tasks == 3 and same_state(snapshot(fresh), expected)
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [CONFIG_NAME, IMPORTANCE_NAME, WEIGHTS_NAME]
    )


def test_an_interrupt_right_after_the_commit_point_keeps_the_new_save(tmp_path, monkeypatch):
    model, directory = saved_mlp(tmp_path)
    model.begin_task(2)
    model.end_task(classification_batches(in_features=6))
    real_fsync = _atomic.fsync_directory

    def interrupted(path):
        if (Path(path) / COMMIT_MARKER).is_file():
            raise Crash
        real_fsync(path)

    monkeypatch.setattr(_atomic, "fsync_directory", interrupted)
    with pytest.raises(Crash):
        model.save_pretrained(directory)
    monkeypatch.undo()
    assert SoftMaskModel.from_pretrained(small_mlp(seed=3, in_features=6), directory).num_tasks == 3


def test_a_load_racing_the_renames_does_not_fail_the_save(tmp_path, monkeypatch):
    model, directory = saved_mlp(tmp_path)
    model.begin_task(2)
    model.end_task(classification_batches(in_features=6))
    real_replace, loads = os.replace, []

    def reader_cuts_in(src, dst):
        if Path(dst).parent == directory and not loads:
            loads.append(None)  # the reader's own renames go straight through
            loads[0] = SoftMaskModel.from_pretrained(small_mlp(seed=3, in_features=6), directory)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", reader_cuts_in)
    model.save_pretrained(directory)
    monkeypatch.undo()
    assert loads[0].num_tasks == 3  # the reader finished the committed save itself
    assert SoftMaskModel.from_pretrained(small_mlp(seed=3, in_features=6), directory).num_tasks == 3


def test_a_killed_uncommitted_save_is_ignored_by_loads_and_cleared_by_the_next_save(tmp_path):
    model, directory = saved_mlp(tmp_path)
    leftover = directory / (STAGING_PREFIX + "killed")
    leftover.mkdir()
    (leftover / WEIGHTS_NAME).write_bytes(b"\x00" * 16)  # killed before its commit marker
    loaded = SoftMaskModel.from_pretrained(small_mlp(seed=3, in_features=6), directory)
    assert loaded.num_tasks == 2 and leftover.is_dir()
    model.save_pretrained(directory)
    assert not leftover.exists()


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
