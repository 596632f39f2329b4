"""Device steps and device importance equal the PyTorch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from edge_helpers import batches, export_copy, max_diff, numpy_batches, torch_weights, train_torch
from softmask_edge import EdgeLearner


def test_initial_weights_and_importance_are_the_models(device_case):
    model, artifacts = device_case
    learner = EdgeLearner(artifacts)
    assert learner.num_tasks == 2
    assert max_diff(learner.parameters(), torch_weights(model)) == 0.0
    assert max_diff(learner.importance(), model.importance) == 0.0
    for k in range(2):
        assert max_diff(learner.task_importance(k), model.task_importance(k)) == 0.0


def test_one_masked_sgd_step_is_the_closed_form(mlp_case):
    """w' = w - lr (1 - A) g for masked tensors; heads: w - lr g (the default head_scaling
    "except_new": only the current task's head has a gradient), g = raw grad."""
    model, artifacts = mlp_case
    net = model.base_model
    x, y = batches(7, n=1)[0]
    lr = 0.3
    loss = F.cross_entropy(net(x, task_id=2), y)
    grads = dict(
        zip(
            [n for n, _ in net.named_parameters()],
            torch.autograd.grad(loss, list(net.parameters()), allow_unused=True),
        )
    )
    a = {n: v.numpy() for n, v in model.importance.items()}
    a_bar = sum(float(v.sum()) for v in a.values()) / sum(v.size for v in a.values())
    expected = {}
    for n, p in net.named_parameters():
        g = np.zeros(tuple(p.shape), np.float32) if grads[n] is None else grads[n].numpy()
        keep = (1.0 - a[n]) if n in a else 1.0
        expected[n] = p.detach().numpy() - lr * keep * g
    learner = EdgeLearner(artifacts)
    learner.learn_task([(x.numpy(), y.numpy())], epochs=1, lr=lr)
    assert 0.0 < a_bar < 1.0
    assert max_diff(learner.parameters(), expected) <= 1e-6


def test_sgd_steps_match_softmask_optimizer_and_importance_matches_spg(device_case):
    """Three epochs of soft-masked SGD, then the importance pass (heads 0..2, cross-head terms
    for the earlier heads). ExecuTorch runs torch's own kernels: within 1e-6 there."""
    model, artifacts = device_case
    data = batches(2)
    learner = EdgeLearner(artifacts)
    exact = learner.runtime == "executorch"
    learner.learn_task(numpy_batches(data), epochs=3, lr=0.1)
    train_torch(model, 2, data, lr=0.1, epochs=3, end=False)
    assert max_diff(learner.parameters(), torch_weights(model)) <= (1e-6 if exact else 1e-5)

    device_task = learner.end_task(numpy_batches(data))
    torch_task = model.end_task(data)
    assert max_diff(device_task, torch_task) <= (1e-6 if exact else 1e-4)
    assert max_diff(learner.importance(), model.importance) <= (1e-6 if exact else 1e-4)
    assert max_diff(learner.task_importance(2), model.task_importance(2)) <= 1e-4
    # the new task mattered: some importance went up
    before = {
        n: torch.maximum(model.task_importance(0)[n], model.task_importance(1)[n])
        for n in torch_task
    }
    assert any((learner.importance()[n] > before[n].numpy() + 1e-3).any() for n in torch_task)

    # the next device task is masked by the updated A and ā, exactly as in torch
    task3 = batches(3)
    learner.learn_task(numpy_batches(task3), epochs=2, lr=0.1)
    train_torch(model, 3, task3, lr=0.1, epochs=2, end=False)
    assert max_diff(learner.parameters(), torch_weights(model)) <= 1e-5


def test_cross_head_term_enters_device_importance(mlp_case):
    """With several heads, task t's importance is max over heads h <= t (not only its own CE)."""
    model, artifacts = mlp_case
    data = batches(2)
    learner = EdgeLearner(artifacts)
    device_task = learner.end_task(numpy_batches(data))
    net = model.base_model
    only_own = {}
    for name, p in net.named_parameters():
        if name not in device_task:
            continue
        g = sum(torch.autograd.grad(F.cross_entropy(net(x, task_id=2), y), p)[0] for x, y in data)
        only_own[name] = torch.tanh((g - g.mean()) / g.std()).abs().numpy()
    # the capacity options keep each tensor's top values, raised to the sharpness: where the
    # device kept a value, it is (max over heads)^s >= (own head)^s
    s = model.softmask_config.importance_sharpness
    kept = {n: device_task[n] > 0 for n in only_own}
    assert all((device_task[n][kept[n]] >= only_own[n][kept[n]] ** s - 1e-5).all() for n in only_own)
    assert max(float(abs(device_task[n][kept[n]] - only_own[n][kept[n]] ** s).max()) for n in only_own) > 1e-2


@pytest.mark.onnx_runtime
def test_fully_important_parameter_is_unchanged_on_device(tmp_path):
    from edge_helpers import mlp_model_after_two_tasks

    model = mlp_model_after_two_tasks()
    model.store.accumulated["backbone.0.weight"] = torch.ones(16, 6)
    artifacts = export_copy(model, tmp_path / "art")
    learner = EdgeLearner(artifacts)
    before = learner.parameters()
    learner.learn_task(numpy_batches(batches(2)), epochs=2, lr=0.5)
    after = learner.parameters()
    np.testing.assert_array_equal(after["backbone.0.weight"], before["backbone.0.weight"])
    assert not np.array_equal(after["backbone.2.weight"], before["backbone.2.weight"])
    assert not np.array_equal(after["heads.2.weight"], before["heads.2.weight"])
