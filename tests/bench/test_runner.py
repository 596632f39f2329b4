"""Training loop, strategies and runner on small real data (the first Split-Digits tasks)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from softmask_bench.benchmarks import Split, split_digits
from softmask_bench.models import MLP, build_classifier
from softmask_bench.runner import check_methods, run_method
from softmask_bench.strategies import EWCStrategy, LwFStrategy, MASStrategy, SoftMaskStrategy
from softmask_bench.training import (
    TrainConfig,
    batches,
    classification_loss,
    evaluate,
    fit,
    train_epoch,
)

from softmask_peft.errors import ConfigError
from softmask_peft.heads import MultiHeadClassifier

TINY = TrainConfig(epochs=3, batch_size=32, patience=2)


def _head(split: Split, n: int) -> Split:
    return Split(split.x[:n], split.y[:n])


@pytest.fixture(scope="module")
def two_tasks():
    """The first two Split-Digits tasks, cut to 96 / 48 / 48 samples to keep the tests fast."""
    bench = split_digits(seed=0)
    tasks = [
        replace(t, train=_head(t.train, 96), val=_head(t.val, 48), test=_head(t.test, 48))
        for t in bench.tasks[:2]
    ]
    return replace(bench, tasks=tasks)


def _multi_head(num_heads: int = 2) -> MultiHeadClassifier:
    torch.manual_seed(0)
    net = MultiHeadClassifier(MLP(64, hidden=(16,)), 16)
    for _ in range(num_heads):
        net.add_head(2)
    return net


def test_mixed_task_loss_scores_each_sample_by_its_head() -> None:
    net = _multi_head(3).eval()
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    tid = torch.tensor([0, 2, 1, 2, 0, 1])
    with torch.no_grad():
        expected = sum(
            F.cross_entropy(net.heads[int(t)](net.backbone(x[i : i + 1])), y[i : i + 1])
            for i, t in enumerate(tid)
        ) / len(y)
        loss = classification_loss(net, x, y, tid)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_fisher_is_the_mean_squared_per_sample_gradient(two_tasks) -> None:
    strategy = EWCStrategy(TINY, ewc_lambda=1.0)
    strategy.setup(_multi_head(0), "task")
    task = two_tasks.tasks[0]
    strategy.begin_task(0, task)
    model = strategy.model
    fisher = strategy._fisher(task, 0)
    model.eval()
    expected = {n: torch.zeros_like(p) for n, p in model.backbone.named_parameters()}
    for i in range(len(task.train)):
        model.zero_grad()
        F.cross_entropy(
            model(task.train.x[i : i + 1], task_id=0), task.train.y[i : i + 1]
        ).backward()
        for n, p in model.backbone.named_parameters():
            expected[n] += p.grad.square()
    assert set(fisher) == {f"backbone.{n}" for n in expected}, "per-task heads are not penalised"
    for n, e in expected.items():
        torch.testing.assert_close(
            fisher[f"backbone.{n}"], e / len(task.train), rtol=1e-4, atol=1e-7
        )


def test_ewc_penalty_closed_form() -> None:
    strategy = EWCStrategy(TINY, ewc_lambda=3.0)
    strategy.setup(build_classifier("mlp", (1, 8, 8), "domain", 10), "domain")
    params = dict(strategy.model.named_parameters())
    zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    twos = {n: torch.full_like(p, 2.0) for n, p in params.items()}
    strategy._anchors = [(zeros, twos), (dict(params.items()), twos)]
    expected = 0.5 * 3.0 * sum(2.0 * float(p.detach().square().sum()) for p in params.values())
    penalty = strategy.penalty(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-5)


def test_fit_stops_early_and_restores_the_best_weights(two_tasks) -> None:
    task = two_tasks.tasks[0]
    net = _multi_head(1)
    train = batches([(task.train, 0)], 32, seed=0)
    val = batches([(task.val, 0)], 256)
    cfg = TrainConfig(epochs=40, lr=25.0, patience=3, lr_patience=100)  # diverges after a while
    history = fit(net, torch.optim.SGD(net.parameters(), lr=cfg.lr), train, val, cfg)
    best = min(range(len(history)), key=lambda i: history[i])
    assert len(history) == best + 1 + cfg.patience < cfg.epochs
    assert evaluate(net, val)[0] == pytest.approx(history[best], rel=1e-6)


def test_uint8_importance_goes_through_the_store(two_tasks) -> None:
    for dtype, quantized in (("uint8", True), ("float32", False)):
        result = run_method("spg", two_tasks, "task", "mlp", 0, TINY, importance_dtype=dtype)
        a = torch.cat([v.flatten() for v in result.model.importance.values()]).double()
        steps = -16 * torch.log2(1 - a[a < 1])  # the log-keep grid: keep = 2^(−c/16)
        assert bool(torch.all((steps - torch.round(steps)).abs() < 0.1)) is quantized
        assert result.model.num_tasks == 2 and result.info["importance_dtype"] == dtype


def test_spg_masks_with_keep_from_the_first_task(two_tasks) -> None:
    strategy = SoftMaskStrategy(TINY)
    strategy.setup(build_classifier("mlp", (1, 8, 8), "task", 2), "task")
    strategy.begin_task(0, two_tasks.tasks[0])
    strategy.end_task(0, two_tasks.tasks[0])
    strategy.begin_task(1, two_tasks.tasks[1])
    a = strategy.model.importance
    total = sum(float(v.sum()) for v in a.values())
    count = sum(v.numel() for v in a.values())
    assert strategy.model.head_keep() == pytest.approx(1 - total / count, rel=1e-6)
    assert set(a) == {
        n for n, _ in strategy.model.base_model.backbone.named_parameters(prefix="backbone")
    }


def test_joint_reports_only_the_final_row(two_tasks) -> None:
    result = run_method("joint", two_tasks, "task", "mlp", 0, TINY)
    assert len(result.matrix) == 1 and len(result.matrix[0]) == 2
    assert result.metrics["bwt"] is None and result.metrics["forgetting"] is None
    assert result.metrics["acc"] == pytest.approx(sum(result.matrix[0]) / 2)
    assert "model" not in result.to_dict()


def test_task_incremental_matrix_is_lower_triangular(two_tasks) -> None:
    result = run_method("finetune", two_tasks, "task", "mlp", 0, TINY)
    assert result.matrix[0][1] is None and all(v is not None for v in result.matrix[1])


def test_unknown_method_or_scenario_is_named(two_tasks) -> None:
    with pytest.raises(ConfigError, match="'sgd-magic'|sgd-magic.*choose from spg"):
        check_methods(["spg", "sgd-magic"])
    with pytest.raises(ConfigError, match="scenario 'class'"):
        run_method("spg", two_tasks, "class", "mlp", 0, TINY)


def test_fit_restores_the_starting_weights_when_training_diverges(two_tasks) -> None:
    task = two_tasks.tasks[0]
    net = _multi_head(1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = TrainConfig(epochs=4, lr=1e30, patience=2)
    train, val = batches([(task.train, 0)], 32, seed=0), batches([(task.val, 0)], 256)
    history = fit(net, torch.optim.SGD(net.parameters(), lr=cfg.lr), train, val, cfg)
    assert not any(torch.isfinite(torch.tensor(history)))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 40)])
def test_cnn_backbone_handles_images_and_signals(shape) -> None:
    net = build_classifier("cnn", shape, "domain", 10)
    assert net(torch.randn(3, *shape)).shape == (3, 10)
    with pytest.raises(ConfigError, match="unknown architecture 'vit'"):
        build_classifier("vit", shape, "task", 2)


def test_fixed_protocol_runs_every_epoch_and_keeps_the_last_weights(two_tasks) -> None:
    task = two_tasks.tasks[0]
    cfg = TrainConfig(protocol="fixed", epochs=4, lr=5.0, patience=1)
    net, twin = _multi_head(1), _multi_head(1)
    val = batches([(task.val, 0)], 256)
    torch.manual_seed(1)  # the same dropout masks in both runs
    history = fit(
        net,
        torch.optim.SGD(net.parameters(), lr=cfg.lr),
        batches([(task.train, 0)], 32, 0),
        val,
        cfg,
    )
    plain = torch.optim.SGD(twin.parameters(), lr=cfg.lr)
    train = batches([(task.train, 0)], 32, 0)
    torch.manual_seed(1)
    for _ in range(4):
        train_epoch(twin, plain, train)
    assert len(history) == 4 and min(history) < history[-1], "the best epoch is not restored"
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ConfigError, match="protocol must be one of"):
        TrainConfig(protocol="early")


def test_mas_importance_is_the_mean_absolute_output_norm_gradient(two_tasks) -> None:
    strategy = MASStrategy(TINY)
    strategy.setup(_multi_head(0), "task")
    task = two_tasks.tasks[0]
    strategy.begin_task(0, task)
    model = strategy.model
    strategy.end_task(0, task)
    ((anchor, omega),) = strategy._anchors
    model.eval()
    expected = {n: torch.zeros_like(p) for n, p in model.backbone.named_parameters()}
    for i in range(len(task.train)):
        model.zero_grad()
        model(task.train.x[i : i + 1], task_id=0).square().sum().backward()
        for n, p in model.backbone.named_parameters():
            expected[n] += p.grad.abs()
    assert set(omega) == {f"backbone.{n}" for n in expected}
    for n, e in expected.items():
        torch.testing.assert_close(
            omega[f"backbone.{n}"], e / len(task.train), rtol=1e-4, atol=1e-7
        )
    strategy.begin_task(1, two_tasks.tasks[1])
    strategy.end_task(1, two_tasks.tasks[1])
    ((_, summed),) = strategy._anchors
    assert all(bool(torch.all(summed[n] >= omega[n])) for n in omega), "Ω accumulates by sum"


def test_lwf_penalty_is_the_temperature_kl_to_the_previous_model(two_tasks) -> None:
    strategy = LwFStrategy(TINY)
    strategy.setup(_multi_head(0), "task")
    strategy.begin_task(0, two_tasks.tasks[0])
    x = two_tasks.tasks[1].train.x[:16]
    tid = torch.ones(16, dtype=torch.long)
    assert strategy.penalty(x, tid) is None, "nothing to distil on the first task"
    strategy.begin_task(1, two_tasks.tasks[1])
    model = strategy.model.eval()
    assert float(strategy.penalty(x, tid).detach()) == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        old = F.softmax(model(x, task_id=0) / 2, dim=1)
        model.backbone.net[1].weight.add_(0.3)
        new = F.log_softmax(model(x, task_id=0) / 2, dim=1)
    expected = float((old * (old.log() - new)).sum() / 16)
    assert expected > 1e-4
    assert float(strategy.penalty(x, tid).detach()) == pytest.approx(expected, rel=1e-4)


def test_replay_memory_holds_samples_of_finished_tasks_only(two_tasks) -> None:
    from softmask_bench.strategies import ReplayStrategy

    strategy = ReplayStrategy(TINY, memory_per_task=10)
    strategy.setup(_multi_head(2), "task")
    assert strategy.penalty(two_tasks.tasks[0].train.x[:4], torch.zeros(4, dtype=torch.long)) is None
    strategy.end_task(0, two_tasks.tasks[0])
    x, y, t = strategy.memory.sample(64)
    assert len(y) == 10 and set(t.tolist()) == {0}  # never more than the memory holds
    train = {r.numpy().tobytes(): int(c) for r, c in zip(two_tasks.tasks[0].train.x, two_tasks.tasks[0].train.y)}
    assert all(train[r.numpy().tobytes()] == int(c) for r, c in zip(x, y))
    strategy.model.eval()  # no dropout: the two losses below must agree exactly
    strategy.memory.generator.manual_seed(7)
    got = strategy.penalty(two_tasks.tasks[1].train.x[:10], torch.ones(10, dtype=torch.long))
    strategy.memory.generator.manual_seed(7)
    again = classification_loss(strategy.model, *strategy.memory.sample(10))
    assert float(got.detach()) == float(again.detach()) > 0


def test_agem_projects_a_conflicting_gradient_onto_the_memorys_half_space(two_tasks) -> None:
    from softmask_bench.strategies import AGEMStrategy

    strategy = AGEMStrategy(TINY, memory_per_task=20, memory_batch=20)
    strategy.setup(_multi_head(2), "task")
    strategy.model.eval()  # no dropout: the reference gradient is reproducible below
    strategy.end_task(0, two_tasks.tasks[0])
    params = list(strategy.model.backbone.parameters())
    # a gradient that points straight against the memory's: -reference
    strategy.memory.generator.manual_seed(3)
    ref = torch.autograd.grad(classification_loss(strategy.model, *strategy.memory.sample(20)), params)
    for p, r in zip(params, ref):
        p.grad = -2.0 * r.clone()
    strategy.memory.generator.manual_seed(3)
    strategy._project()
    # g - (g·r / r·r) r with g = -2r is 0
    assert all(float(p.grad.abs().max()) < 1e-6 for p in params)
    # an agreeing gradient is left alone
    for p, r in zip(params, ref):
        p.grad = 0.5 * r.clone()
    strategy.memory.generator.manual_seed(3)
    strategy._project()
    assert all(torch.equal(p.grad, 0.5 * r) for p, r in zip(params, ref))


def test_per_task_index_curves_from_the_matrix_and_capacity() -> None:
    from softmask_bench.report import per_task_index
    from softmask_bench.runner import RunResult

    runs = [
        RunResult("spg", s, "b", "task", "mlp", [[90.0, None], [80.0, 70.0 + 10 * s]], {}, [], 0.0,
                  {"capacity": [{"saturation": 0.1 * (s + 1), "mean_keep": 0.5}, {"saturation": 0.4, "mean_keep": 0.3}]})
        for s in (0, 1)
    ]
    curves = per_task_index(runs)
    assert curves["plasticity"] == pytest.approx([90.0, 75.0])
    assert curves["saturation"] == pytest.approx([0.15, 0.4])
    assert curves["mean_keep"] == pytest.approx([0.5, 0.3])


def test_mixed_task_loss_routes_each_sample_through_its_tasks_adapters() -> None:
    torch.manual_seed(0)
    net = MultiHeadClassifier(MLP(64, hidden=(16,)), 16, adapter_rank=2).eval()
    for _ in range(2):
        net.add_head(2)
    with torch.no_grad():
        for p in net.task_adapters.parameters():
            p.normal_()
    x, y, tid = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        expected = sum(
            F.cross_entropy(net(x[i : i + 1], task_id=int(t)), y[i : i + 1])
            for i, t in enumerate(tid)
        ) / len(y)
        loss = classification_loss(net, x, y, tid)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_spg_adapters_keep_every_task_adapter(two_tasks) -> None:
    result = run_method("spg-adapters", two_tasks, "task", "mlp", 0, TINY, adapter_rank=3)
    model = result.model
    assert len(model.base_model.task_adapters) == 2
    assert model.base_model.task_adapters[0][0].A.shape == (3, 64)
    assert result.info["adapter_rank"] == 3 and result.info["importance_budget"] is None
    assert result.info["adapter_init"] == "fresh" and result.info["adapter_freeze_a"] is False
    assert not any("task_adapters" in n for n in model.importance)


def test_spg_adapters_take_the_adapter_options(two_tasks) -> None:
    options = {"adapter_scale": 4.0, "adapter_freeze_a": True, "adapter_init": "previous"}
    result = run_method(
        "spg-adapters", two_tasks, "task", "mlp", 0, TINY, adapter_rank=2, adapter_options=options
    )
    assert {k: result.info[k] for k in options} == options
    assert not any(a.A.requires_grad for t in result.model.base_model.task_adapters for a in t)


def test_spg_adapters_in_the_domain_scenario_infer_each_samples_task(two_tasks) -> None:
    result = run_method("spg-adapters", two_tasks, "domain", "mlp", 0, TINY, adapter_rank=2)
    net = result.model.base_model
    assert len(net.heads) == 2 and len(net.task_adapters) == 2
    assert all(v is not None for row in result.matrix for v in row)  # every task, every row
    test = two_tasks.tasks[1].test
    net.eval()
    with torch.no_grad():
        logits, _ = net.forward_inferred(test.x)
    expected = 100.0 * float((logits.argmax(1) == test.y).float().mean())
    assert result.matrix[-1][1] == pytest.approx(expected)
