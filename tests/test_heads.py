"""MultiHeadClassifier: one linear head per task on a shared backbone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from softmask_peft import (
    ConfigError,
    SoftMaskConfig,
    SoftMaskError,
    SoftMaskModel,
    SoftMaskOptimizer,
    TaskOrderError,
    TaskRecord,
    get_softmask_model,
)
from softmask_peft.heads import MultiHeadClassifier, expand_heads


def test_add_head_returns_index_and_activates_it():
    net = MultiHeadClassifier(nn.Identity(), 4)
    with pytest.raises(TaskOrderError, match="0 head"):
        net(torch.zeros(1, 4))
    assert net.add_head(2) == 0
    assert net.add_head(5) == 1
    assert net.active_task == 1
    assert [h.out_features for h in net.heads] == [2, 5]


def test_forward_is_the_chosen_heads_affine_map_of_the_features():
    net = MultiHeadClassifier(nn.Identity(), 3)
    net.add_head(2)
    net.add_head(4)
    x = torch.randn(5, 3)
    for t in (0, 1):
        W, b = net.heads[t].weight, net.heads[t].bias
        torch.testing.assert_close(net(x, task_id=t), x @ W.T + b)
    torch.testing.assert_close(net(x), net(x, task_id=1))
    outs = net.forward_all(x)
    assert [o.shape for o in outs] == [(5, 2), (5, 4)]
    torch.testing.assert_close(outs[0], net(x, task_id=0))
    with pytest.raises(TaskOrderError, match="task 2"):
        net(x, task_id=2)


def test_features_is_the_backbone():
    backbone = nn.Linear(3, 4)
    net = MultiHeadClassifier(backbone, 4)
    x = torch.randn(2, 3)
    torch.testing.assert_close(net.features(x), backbone(x))


def test_new_head_follows_backbone_dtype():
    net = MultiHeadClassifier(nn.Linear(3, 4).double(), 4)
    net.add_head(2)
    assert net.heads[0].weight.dtype == torch.float64


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_sizes(bad):
    with pytest.raises(ValueError, match="feature_dim"):
        MultiHeadClassifier(nn.Identity(), bad)
    net = MultiHeadClassifier(nn.Identity(), 2)
    with pytest.raises(ValueError, match="num_classes"):
        net.add_head(bad)


def test_expand_heads_rebuilds_saved_heads():
    net = MultiHeadClassifier(nn.Linear(3, 4), 4)
    expand_heads(net, [2, 3, 5])
    assert [h.out_features for h in net.heads] == [2, 3, 5] and net.active_task == 2
    fresh = MultiHeadClassifier(nn.Linear(3, 4), 4)
    with pytest.raises(TaskOrderError, match="class count"):
        expand_heads(fresh, [None])
    plain = nn.Linear(3, 4)
    expand_heads(plain, [2])  # not a multi-head model: nothing to do
    assert not hasattr(plain, "heads")


def test_begin_task_adds_one_head_per_task_and_needs_num_classes():
    net = MultiHeadClassifier(nn.Linear(3, 4), 4)
    model = get_softmask_model(net, SoftMaskConfig())
    with pytest.raises(TaskOrderError, match="num_classes"):
        model.begin_task(0)
    model.begin_task(0, num_classes=2)
    model.begin_task(0, num_classes=2)  # re-entering the running task adds nothing
    assert len(net.heads) == 1
    assert model.task_log == (TaskRecord("task_0", 2),)
    model.end_task([(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))])
    model.begin_task(1, num_classes=3, name="second")
    assert [h.out_features for h in net.heads] == [2, 3] and net.active_task == 1
    assert [t.name for t in model.task_log] == ["task_0", "second"]
    assert model.head_parameter_names == [
        "heads.0.weight",
        "heads.0.bias",
        "heads.1.weight",
        "heads.1.bias",
    ]


def test_default_heads_are_only_the_top_level_task_heads():
    backbone = nn.Sequential()
    backbone.add_module("body", nn.Linear(4, 6))
    backbone.add_module("heads", nn.Linear(6, 5))
    model = get_softmask_model(MultiHeadClassifier(backbone, 5), SoftMaskConfig())
    model.begin_task(0, num_classes=2)
    assert model.masked_parameter_names == [
        "backbone.body.weight",
        "backbone.body.bias",
        "backbone.heads.weight",
        "backbone.heads.bias",
    ]
    assert model.head_parameter_names == ["heads.0.weight", "heads.0.bias"]


def test_the_current_head_comes_from_the_store_alone():
    """One source for the current task: the store's open task, else the last one learned."""
    net = MultiHeadClassifier(nn.Linear(3, 4), 4)
    for n in (2, 3, 5):  # heads declared ahead of the tasks (as a device export does)
        net.add_head(n)
    model = get_softmask_model(net, SoftMaskConfig())
    x = torch.randn(6, 3)
    model.begin_task(0, num_classes=2)
    assert model(x).shape == (6, 2)  # task 0's head, not the newest (5 classes)
    model.end_task([(x, torch.zeros(6, dtype=torch.long))])
    assert model.current_task is None
    assert model(x).shape == (6, 2)  # after end_task: the last task learned
    assert model(x, task_id=2).shape == (6, 5)  # an explicit id wins
    assert model(x, 1).shape == (6, 3)
    model.begin_task(1, num_classes=3)
    assert model(x).shape == (6, 3)
    assert net(x).shape == (6, 5)  # the bare classifier: its newest head
    assert "active_task" not in vars(net)  # nothing to keep in sync with the store
    with pytest.raises(AttributeError):
        net.active_task = 0


# task adapters ---------------------------------------------------------------------------------


def _adapted(rank: int = 2, seed: int = 0) -> MultiHeadClassifier:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU())
    return MultiHeadClassifier(backbone, 5, adapter_rank=rank, adapter_scale=1.5)


def test_task_adapter_is_a_routed_low_rank_update_of_each_linear():
    net = _adapted()
    net.add_head(3)
    net.add_head(2)
    with torch.no_grad():
        for p in net.task_adapters.parameters():
            p.normal_()
    x = torch.randn(7, 4)
    l1, l2 = net.backbone[0], net.backbone[2]
    for t in (0, 1):
        (A1, B1), (A2, B2) = ((a.A, a.B) for a in net.task_adapters[t])
        h = torch.relu(x @ l1.weight.T + l1.bias + 1.5 * (x @ A1.T @ B1.T))
        z = torch.relu(h @ l2.weight.T + l2.bias + 1.5 * (h @ A2.T @ B2.T))
        torch.testing.assert_close(net.features(x, t), z)
        torch.testing.assert_close(net(x, t), z @ net.heads[t].weight.T + net.heads[t].bias)
    torch.testing.assert_close(net(x), net(x, 1))  # no task id: the newest
    torch.testing.assert_close(net.forward_all(x)[0], net(x, 0))
    assert not torch.equal(net(x, 0)[:, :2], net.heads[0](net.features(x, 1))[:, :2])


def test_a_new_task_adapter_starts_as_the_shared_network():
    net = _adapted()
    net.add_head(3)
    x = torch.randn(4, 4)
    torch.testing.assert_close(net.features(x, 0), net.backbone(x))
    assert net.task_parameter_shapes(1, 2) == {
        "heads.1.weight": (2, 5), "heads.1.bias": (2,),
        "task_adapters.1.0.A": (2, 4), "task_adapters.1.0.B": (6, 2),
        "task_adapters.1.1.A": (2, 6), "task_adapters.1.1.B": (5, 2),
    }
    net.add_head(2)
    created = {n: tuple(p.shape) for n, p in net.named_parameters()}
    assert {n: created[n] for n in net.task_parameter_shapes(1, 2)} == net.task_parameter_shapes(1, 2)


def test_deepcopy_routes_through_its_own_adapters():
    import copy

    net = _adapted()
    net.add_head(3)
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.task_adapters[0][0].B.fill_(1.0)
    x = torch.randn(3, 4)
    torch.testing.assert_close(net.features(x, 0), net.backbone(x))
    assert not torch.allclose(twin.features(x, 0), twin.backbone(x))


@pytest.mark.parametrize("rank, scale", [(-1, 1.0), (1.5, 1.0), (True, 1.0), (2, 0.0), (2, float("inf"))])
def test_bad_adapter_options_are_config_errors(rank, scale):
    with pytest.raises(ConfigError, match="adapter_"):
        MultiHeadClassifier(nn.Linear(3, 4), 4, adapter_rank=rank, adapter_scale=scale)


@pytest.mark.parametrize("options", [{"adapter_init": "zero"}, {"adapter_freeze_a": "yes"}])
def test_bad_adapter_start_options_are_config_errors(options):
    with pytest.raises(ConfigError, match=next(iter(options))):
        MultiHeadClassifier(nn.Linear(3, 4), 4, adapter_rank=2, **options)


def test_a_task_adapter_starts_from_the_previous_one_or_fresh():
    x = torch.randn(6, 4)
    for init in ("previous", "fresh"):
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5))
        net = MultiHeadClassifier(backbone, 5, adapter_rank=2, adapter_init=init)
        net.add_head(3)
        with torch.no_grad():
            for p in net.task_adapters[0].parameters():
                p.normal_()
        net.add_head(3)
        old, new = net.task_adapters
        if init == "previous":  # task 1 starts where task 0 ended, in parameters of its own
            torch.testing.assert_close(net.features(x, 1), net.features(x, 0), rtol=0, atol=0)
            for p, q in zip(new.parameters(), old.parameters()):
                assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
        else:
            assert all(not a.B.any() for a in new)
            torch.testing.assert_close(net.features(x, 1), backbone(x), rtol=0, atol=0)
            assert not torch.allclose(net.features(x, 0), backbone(x))


def test_frozen_adapter_a_stays_fixed_and_round_trips(tmp_path):
    def net(seed: int) -> MultiHeadClassifier:
        torch.manual_seed(seed)
        backbone = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU())
        return MultiHeadClassifier(backbone, 5, adapter_rank=3, adapter_freeze_a=True)

    model = get_softmask_model(net(0), SoftMaskConfig())
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    model.begin_task(0, num_classes=3)
    adapters = model.base_model.task_adapters[0]
    A0 = [a.A.detach().clone() for a in adapters]
    B0 = [a.B.detach().clone() for a in adapters]
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.end_task([(x, y)])
    for a, A, B in zip(adapters, A0, B0):
        assert not a.A.requires_grad and torch.equal(a.A, A)
        assert not torch.equal(a.B, B)  # B alone trains
    assert not any(n.endswith(".A") for n in model.head_parameter_names)
    model.save_pretrained(tmp_path)
    loaded = SoftMaskModel.from_pretrained(net(9), tmp_path)
    assert all(not a.A.requires_grad and a.B.requires_grad for a in loaded.base_model.task_adapters[0])
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x, task_id=0), model(x, task_id=0), rtol=0, atol=0)


def test_adapters_need_a_linear_layer():
    with pytest.raises(ConfigError, match="nn.Linear"):
        MultiHeadClassifier(nn.Identity(), 4, adapter_rank=2)


def _train_task(model, t: int, x, y, steps: int = 5) -> None:
    model.begin_task(t, num_classes=3)
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.end_task([(x, y)])


def test_adapters_are_per_task_parameters_a_later_task_never_moves():
    net = _adapted()
    model = get_softmask_model(net, SoftMaskConfig())
    assert model.softmask_config.head_modules == "heads|task_adapters"
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    _train_task(model, 0, x, y)
    assert not any("task_adapters" in n for n in model.masked_parameter_names)
    assert not any("task_adapters" in n for n in model.importance)
    before = {n: p.detach().clone() for n, p in net.task_adapters[0].named_parameters()}
    model.begin_task(1, num_classes=3)
    # the new task's adapter trains unscaled, as its head (head_scaling="except_new")
    assert {id(p) for p in net.task_parameters(1)} <= model._unscaled_head_parameters()
    B1_start = net.task_adapters[1][0].B.detach().clone()
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for n, p in net.task_adapters[0].named_parameters():
        assert torch.equal(p, before[n]), n
    assert not torch.equal(net.task_adapters[1][0].B, B1_start)  # the optimizer adopted it


def test_adapters_round_trip_through_save_and_load(tmp_path):
    model = get_softmask_model(_adapted(), SoftMaskConfig())
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for t in range(2):
        _train_task(model, t, x, y)
    model.save_pretrained(tmp_path)
    fresh = _adapted(seed=9)
    loaded = SoftMaskModel.from_pretrained(fresh, tmp_path)
    assert len(fresh.task_adapters) == 2
    model.eval(), loaded.eval()
    for t in range(2):
        torch.testing.assert_close(loaded(x, task_id=t), model(x, task_id=t), rtol=0, atol=0)


def test_adapters_saved_do_not_load_into_a_model_without_them(tmp_path):
    model = get_softmask_model(_adapted(), SoftMaskConfig())
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    _train_task(model, 0, x, y)
    model.save_pretrained(tmp_path)
    plain = MultiHeadClassifier(_adapted().backbone, 5)
    with pytest.raises(SoftMaskError, match="task_adapters"):
        SoftMaskModel.from_pretrained(plain, tmp_path)
    assert len(plain.heads) == 0  # nothing changed


@pytest.mark.parametrize(
    "runtime", [pytest.param("onnxruntime", marks=pytest.mark.onnx_runtime), "executorch"]
)
def test_device_export_refuses_task_adapters(tmp_path, runtime):
    from softmask_peft.device import export_for_device

    model = get_softmask_model(_adapted(), SoftMaskConfig())
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    _train_task(model, 0, x, y)
    with pytest.raises(ConfigError, match="task adapters"):
        export_for_device(model, x[:2], tmp_path / "dev", future_heads=[3], runtime=runtime)
    assert not (tmp_path / "dev").exists()


def test_forward_inferred_takes_each_samples_lowest_energy_head():
    net = MultiHeadClassifier(nn.Identity(), 2)
    for _ in range(3):
        net.add_head(2)
    with torch.no_grad():  # head t: logits = scale_t * (x0, x1)
        for t, scale in enumerate((1.0, 3.0, 0.5)):
            net.heads[t].weight.copy_(scale * torch.eye(2))
            net.heads[t].bias.zero_()
    x = torch.tensor([[2.0, 0.0], [-1.0, -1.0], [0.0, 0.0]])
    # logsumexp per head: sample 0 -> head 1 (6.0...), sample 1 -> head 2 (-0.5+ln2 beats -1+ln2
    # and -3+ln2), sample 2: every head ln 2 -> the first
    logits, tasks = net.forward_inferred(x)
    assert tasks.tolist() == [1, 2, 0]
    torch.testing.assert_close(logits, torch.stack([3.0 * x[0], 0.5 * x[1], 1.0 * x[2]]))


def test_forward_inferred_needs_heads_of_one_width():
    net = MultiHeadClassifier(nn.Identity(), 2)
    with pytest.raises(TaskOrderError, match="no head"):
        net.forward_inferred(torch.zeros(1, 2))
    net.add_head(2)
    net.add_head(3)
    with pytest.raises(ConfigError, match=r"same classes; these have \[2, 3\]"):
        net.forward_inferred(torch.zeros(1, 2))


def test_forward_inferred_routes_through_each_tasks_adapters():
    net = _adapted()
    for _ in range(2):
        net.add_head(3)
    with torch.no_grad():
        for p in net.task_adapters.parameters():
            p.normal_()
    x = torch.randn(6, 4)
    logits, tasks = net.forward_inferred(x)
    for i, t in enumerate(tasks.tolist()):
        torch.testing.assert_close(logits[i], net(x[i : i + 1], task_id=t)[0])
        other = net(x[i : i + 1], task_id=1 - t)[0]
        assert torch.logsumexp(other, 0) <= torch.logsumexp(logits[i], 0)
