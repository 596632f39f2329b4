"""Torch side of the device export: export_for_device and load_device_checkpoint."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent / "edge"))

from edge_helpers import (  # noqa: E402
    IN_FEATURES,
    batches,
    export_copy,
    mlp_model_after_two_tasks,
    mlp_multihead,
    numpy_batches,
    train_torch,
)
from helpers import ENDS_UNTRAINED
from softmask_edge import EdgeLearner, ExportError  # noqa: E402

from softmask_peft import (  # noqa: E402
    ConfigError,
    ImportanceMismatchError,
    SoftMaskConfig,
    SoftMaskModel,
    TaskOrderError,
    get_softmask_model,
)
from softmask_peft.device import export_for_device, load_device_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def device_run(tmp_path_factory):
    """Tasks 0-1 in torch, exported with two declared heads, tasks 2-3 learned on the device."""
    model = mlp_model_after_two_tasks(extra_heads=())
    torch_before = copy.deepcopy(model)
    artifacts = tmp_path_factory.mktemp("export") / "artifacts"
    manifest = export_for_device(model, torch.randn(4, IN_FEATURES), artifacts, future_heads=[2, 3])
    learner = EdgeLearner(artifacts)
    for t in (2, 3):
        data = numpy_batches(batches(t, classes=learner.manifest.head_classes[t]))
        learner.learn_task(data, epochs=2, lr=0.1)
        learner.end_task(data, name=f"device_{t}")
    learner.save()
    return torch_before, manifest, learner, artifacts


def test_manifest_describes_the_model(device_run):
    model, manifest, _, _ = device_run
    params = dict(model.base_model.named_parameters())
    assert len(model.base_model.heads) == 2  # export did not touch the user's model
    assert manifest.masked == model.masked_parameter_names
    assert manifest.heads == [f"heads.{k}.{w}" for k in range(4) for w in ("weight", "bias")]
    assert manifest.head_classes == [2, 2, 2, 3]
    for name, p in params.items():
        assert manifest.params[name] == list(p.shape)
    assert [(s.name, s.dtype, s.shape) for s in manifest.inputs] == [
        ("input", "float32", [None, IN_FEATURES])
    ]
    assert manifest.num_tasks == 2 and manifest.task_names == ["task_0", "task_1"]
    assert {"torch", "onnx", "numpy", "softmask-peft"} <= set(manifest.versions)


def test_device_checkpoint_loads_back_into_softmask_model(device_run, tmp_path):
    model, _, learner, artifacts = device_run
    model = copy.deepcopy(model)
    load_device_checkpoint(model, artifacts)
    weights = learner.parameters()
    for name, p in model.base_model.named_parameters():
        np.testing.assert_array_equal(p.detach().numpy(), weights[name])
    assert len(model.base_model.heads) == 4 and model.num_tasks == 4
    for name, a in learner.importance().items():
        np.testing.assert_array_equal(model.importance[name].numpy(), a)
    for k in range(4):
        for name, a in learner.task_importance(k).items():
            np.testing.assert_array_equal(model.task_importance(k)[name].numpy(), a)
    assert [(t.name, t.num_classes) for t in model.task_log] == [
        ("task_0", 2), ("task_1", 2), ("device_2", 2), ("device_3", 3)
    ]
    # the server can keep going: the masks now come from the device's importance
    model.begin_task(4, num_classes=2)
    keep = model.keep_masks.groups[0].keep[0]
    np.testing.assert_allclose(keep.numpy(), 1 - learner.importance()["backbone.0.weight"])
    model.save_pretrained(tmp_path / "saved")


def test_mismatched_model_is_refused_and_left_unchanged(device_run):
    _, _, _, artifacts = device_run
    torch.manual_seed(1)
    backbone = nn.Sequential(nn.Linear(IN_FEATURES, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh())
    from softmask_peft.heads import MultiHeadClassifier

    other = get_softmask_model(MultiHeadClassifier(backbone, 8), SoftMaskConfig())
    train_torch(other, 0, batches(0))
    before = {n: p.detach().clone() for n, p in other.base_model.named_parameters()}
    with pytest.raises(ImportanceMismatchError, match=r"backbone.0.weight: device shape \(16, 6\)"):
        load_device_checkpoint(other, artifacts)
    assert len(other.base_model.heads) == 1 and other.num_tasks == 1
    for n, p in other.base_model.named_parameters():
        assert torch.equal(p, before[n])


def test_export_refuses_bad_requests(tmp_path):
    net = mlp_multihead()
    model = get_softmask_model(net, SoftMaskConfig())
    train_torch(model, 0, batches(0))
    x = torch.randn(2, IN_FEATURES)
    with pytest.raises(ConfigError, match="future_heads"):
        export_for_device(model, x, tmp_path / "a")
    with pytest.raises(ExportError, match="optimizer must be one of"):
        export_for_device(model, x, tmp_path / "a", future_heads=[2], optimizer="lamb")
    with pytest.raises(TypeError, match="example_inputs"):
        export_for_device(model, "not a tensor", tmp_path / "a", future_heads=[2])
    model.begin_task(1, num_classes=2)
    with pytest.raises(TaskOrderError, match="still open"):
        export_for_device(model, x, tmp_path / "a")
    plain = get_softmask_model(nn.Sequential(nn.Linear(IN_FEATURES, 3)), SoftMaskConfig())
    with pytest.raises(ConfigError, match="MultiHeadClassifier"):
        export_for_device(plain, x, tmp_path / "b", future_heads=[2])
    assert not (tmp_path / "a" / "manifest.json").exists()


def test_first_task_on_device_starts_from_zero_importance(tmp_path):
    """A model exported before any task: importance 0, so device training is unmasked."""
    net = nn.Sequential(nn.Linear(IN_FEATURES, 8), nn.Tanh(), nn.Linear(8, 2))
    model = get_softmask_model(net, SoftMaskConfig(head_modules=["2"]))
    artifacts = export_copy(model, tmp_path / "art")
    learner = EdgeLearner(artifacts)
    assert learner.num_tasks == 0
    assert all(not a.any() for a in learner.importance().values())
    x, y = batches(0, n=1)[0]
    lr = 0.2
    loss = nn.functional.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    expected = {
        n: (p - lr * g).detach().numpy() for (n, p), g in zip(net.named_parameters(), grads)
    }
    learner.learn_task([(x.numpy(), y.numpy())], lr=lr)
    for name, value in learner.parameters().items():
        np.testing.assert_allclose(value, expected[name], atol=1e-6)
    learner.end_task([(x.numpy(), y.numpy())])
    learner.save()
    restored = load_device_checkpoint(
        SoftMaskModel(copy.deepcopy(net), SoftMaskConfig(head_modules=["2"])), artifacts
    )
    assert restored.num_tasks == 1 and restored.task_log[0].num_classes is None


@ENDS_UNTRAINED
def test_a_device_checkpoint_behind_the_model_is_refused(device_run, tmp_path):
    model, _, _, _ = device_run
    model = copy.deepcopy(model)
    early = tmp_path / "early"
    export_for_device(copy.deepcopy(model), torch.randn(4, IN_FEATURES), early, future_heads=[2])
    data = batches(2)
    model.begin_task(2, num_classes=2, name="server_2")  # the server moves on meanwhile
    model.end_task(data)
    model.begin_task(3, num_classes=2, name="server_3")
    model.end_task(data)
    before = copy.deepcopy(model.state_dict()), dict(model.importance)
    with pytest.raises(ImportanceMismatchError, match="behind this model"):
        load_device_checkpoint(model, early)
    assert model.num_tasks == 4 and len(model.base_model.heads) == 4
    assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, before[1][k]) for k, v in model.importance.items())


def test_a_device_checkpoint_from_another_run_is_refused(device_run):
    _, _, _, artifacts = device_run
    other = mlp_model_after_two_tasks(extra_heads=())
    other.store.tasks[0] = other.store.tasks[0].__class__("renamed", 2)
    with pytest.raises(ImportanceMismatchError, match="diverges"):
        load_device_checkpoint(other, artifacts)
    assert other.num_tasks == 2


@pytest.mark.parametrize("head_scaling", ["all", "except_new"])
def test_the_device_scales_the_new_head_as_the_config_says(head_scaling, tmp_path):
    """One SGD step of the device's new head: w - lr k g, k = 1 - ā under "all", else 1."""
    model = get_softmask_model(mlp_multihead(), SoftMaskConfig(head_scaling=head_scaling))
    for t in (0, 1):
        train_torch(model, t, batches(t), lr=0.1, epochs=2)
    export_for_device(model, torch.randn(4, IN_FEATURES), tmp_path, future_heads=[2])
    learner = EdgeLearner(tmp_path)
    start = learner.parameters()
    net = model.base_model
    net.add_head(2)
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(torch.from_numpy(start[n]))
    x, y = batches(5, n=1)[0]
    head = net.heads[2].weight
    (g,) = torch.autograd.grad(F.cross_entropy(net(x, task_id=2), y), [head])
    a = model.importance
    a_bar = sum(float(v.sum()) for v in a.values()) / sum(v.numel() for v in a.values())
    keep = 1.0 - a_bar if head_scaling == "all" else 1.0
    learner.learn_task([(x.numpy(), y.numpy())], epochs=1, lr=0.5)
    expected = start["heads.2.weight"] - 0.5 * keep * g.numpy()
    assert 0 < a_bar < 1 and learner.manifest.heads_scaled is (head_scaling == "all")
    np.testing.assert_allclose(learner.parameters()["heads.2.weight"], expected, atol=1e-6)
