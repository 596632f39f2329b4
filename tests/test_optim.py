"""SoftMaskOptimizer keeps torch.optim's contract."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import classification_batches, multi_head, same_state, snapshot
from torch import nn

from softmask_peft import ConfigError, SoftMaskConfig, SoftMaskOptimizer, get_softmask_model
from softmask_peft.testing import seed_importance


def model_at_task_one(net=None, mode: str = "grad"):
    net = net if net is not None else nn.Linear(4, 3)
    model = get_softmask_model(net, SoftMaskConfig(mask_mode=mode))
    model.begin_task(0)
    seed_importance(model, {"weight": torch.full((3, 4), 0.5), "bias": torch.zeros(3)})
    model.begin_task(1)
    return model


def loss_of(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def test_is_an_optimizer_and_rejects_bad_arguments():
    model = model_at_task_one()
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    assert isinstance(opt, torch.optim.Optimizer)
    assert "SGD" in repr(opt)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        SoftMaskOptimizer(object(), model)
    with pytest.raises(ConfigError, match="mask_mode"):
        SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, mask_mode="bogus")


def test_mask_mode_defaults_to_the_config_and_can_be_overridden():
    model = model_at_task_one(mode="update")
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    assert SoftMaskOptimizer(base, model).mask_mode == "update"
    assert SoftMaskOptimizer(base, model, mask_mode="grad").mask_mode == "grad"


def test_zero_grad_and_step_with_closure_returns_the_loss():
    model = model_at_task_one()
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    batch = classification_batches()[0]
    w0 = model.base_model.weight.detach().clone()

    def closure():
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        return loss

    with torch.no_grad():  # step must enable grad for the closure, as torch.optim does
        expected = float(loss_of(model, batch))
        loss = opt.step(closure)
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-7)
    assert not torch.equal(model.base_model.weight, w0)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    loss_of(model, batch).backward()
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    assert opt.step() is None


def test_param_groups_state_and_defaults_are_the_base_optimizers():
    model = model_at_task_one()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = SoftMaskOptimizer(base, model)
    assert opt.param_groups is base.param_groups
    assert opt.defaults is base.defaults
    opt.param_groups[0]["lr"] = 0.05
    assert base.param_groups[0]["lr"] == 0.05
    loss_of(model, classification_batches()[0]).backward()
    opt.step()
    assert opt.state is base.state
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())
    extra = nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra], "lr": 1.0})
    assert len(base.param_groups) == 2 and base.param_groups[1]["params"][0] is extra


def test_state_dict_round_trip_continues_identically():
    batches = classification_batches(n=16)
    model_a = model_at_task_one()
    opt_a = SoftMaskOptimizer(torch.optim.SGD(model_a.parameters(), lr=0.1, momentum=0.9), model_a)
    for b in batches[:2]:
        opt_a.zero_grad()
        loss_of(model_a, b).backward()
        opt_a.step()
    state = opt_a.state_dict()
    assert state["param_groups"] == opt_a.base.state_dict()["param_groups"]
    assert sorted(state["state"]) == [0, 1]
    model_b = model_at_task_one(copy.deepcopy(model_a.base_model))
    opt_b = SoftMaskOptimizer(torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9), model_b)
    opt_b.load_state_dict(copy.deepcopy(state))
    for b in batches[2:]:
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            opt.zero_grad()
            loss_of(model, b).backward()
            opt.step()
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


def test_step_lr_scheduler_changes_the_lr():
    model = model_at_task_one()
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lrs = []
    for b in classification_batches(n=16):
        opt.zero_grad()
        loss_of(model, b).backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025])
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.025)


def test_reduce_lr_on_plateau_changes_the_lr():
    model = model_at_task_one()
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.25), model)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=1)
    for val_loss in (1.0, 1.0, 1.0):
        sched.step(val_loss)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_keep_masks_built_once_per_task():
    net = multi_head()
    model = get_softmask_model(net, SoftMaskConfig())
    model.begin_task(0, num_classes=3)
    first = model.keep_masks
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    batches = classification_batches()
    for b in batches:
        opt.zero_grad()
        loss_of(model, b).backward()
        opt.step()
    assert model.keep_masks is first and first.groups == [] and first.head_keep == 1.0
    model.end_task(batches)
    assert model.keep_masks is None  # no task open
    model.begin_task(1, num_classes=2)
    masks = model.keep_masks
    assert masks is not first and masks.groups
    seen = []
    for x, _ in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long)).backward()
        opt.step()
        seen.append(opt._current())
    assert all(m is masks for m in seen) and model.keep_masks is masks


def test_a_step_with_no_task_begun_warns_once_and_is_unmasked():
    model = get_softmask_model(nn.Linear(4, 3), SoftMaskConfig())
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.warns(UserWarning, match="no task begun"):
        loss_of(model, classification_batches()[0]).backward()
        opt.step()


def test_masks_can_be_given_as_a_value_or_a_callable():
    model = model_at_task_one()
    for source in (model.keep_masks, lambda: model.keep_masks):
        opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), source, "grad")
        w0 = model.base_model.weight.detach().clone()
        opt.zero_grad()
        loss_of(model, classification_batches()[0]).backward()
        g = model.base_model.weight.grad.clone()
        opt.step()
        torch.testing.assert_close(model.base_model.weight.detach(), w0 - 0.1 * 0.5 * g)
    with pytest.raises(TypeError, match="get_softmask_model"):
        SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), nn.Linear(4, 3))


def test_auto_mask_mode_follows_the_optimizer():
    model = model_at_task_one(mode="auto")
    sgd = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    adamw = SoftMaskOptimizer(torch.optim.AdamW(model.parameters()), model)
    assert (sgd.mask_mode, adamw.mask_mode) == ("grad", "update")
    with pytest.warns(UserWarning, match="barely protected"):
        SoftMaskOptimizer(torch.optim.Adam(model.parameters()), model, mask_mode="grad")


def test_new_head_parameters_are_adopted_after_begin_task():
    net = multi_head()
    model = get_softmask_model(net, SoftMaskConfig(head_scaling="all"))  # scaled: tested too
    model.begin_task(0, num_classes=3)
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    batches = classification_batches()
    model.end_task(batches)
    model.begin_task(1, num_classes=2)
    new_head = list(net.heads[1].parameters())
    before = [p.detach().clone() for p in new_head]
    x, _ = batches[0]
    opt.zero_grad()
    F.cross_entropy(model(x), torch.ones(len(x), dtype=torch.long)).backward()
    raw = [p.grad.clone() for p in new_head]
    opt.step()
    group_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in group_ids for p in new_head)
    assert len(opt.param_groups) == 1
    assert all(not torch.equal(p, b) for p, b in zip(new_head, before))
    # the new head trains, scaled by the head keep scalar 1 - ā
    keep = model.head_keep()
    assert 0 < keep < 1
    for p, b, g in zip(new_head, before, raw):
        torch.testing.assert_close(p.detach(), b - 0.1 * keep * g, rtol=0, atol=1e-6)


def test_parameters_left_out_of_the_optimizer_on_purpose_stay_out():
    net = multi_head()
    model = get_softmask_model(net, SoftMaskConfig())
    model.begin_task(0, num_classes=3)
    with pytest.warns(UserWarning, match="none of the model's masked parameters"):
        opt = SoftMaskOptimizer(torch.optim.SGD(net.heads.parameters(), lr=0.1), model)
    w0 = net.backbone.weight.detach().clone()
    x, y = classification_batches()[0]
    loss_of(model, (x, y)).backward()
    opt.step()
    assert len(opt.param_groups[0]["params"]) == 2
    assert torch.equal(net.backbone.weight, w0)


def test_step_hooks_of_torch_optim_work():
    model = model_at_task_one()
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    loss_of(model, classification_batches()[0]).backward()
    opt.step()
    assert calls == ["pre", "post"]


def test_global_step_hooks_see_the_masked_parameters_through_the_wrapper():
    from torch.optim.optimizer import register_optimizer_step_post_hook

    model = model_at_task_one()
    base = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt = SoftMaskOptimizer(base, model, mask_mode="update")
    seen = []
    handle = register_optimizer_step_post_hook(
        lambda o, args, kwargs: seen.append((o, snapshot(model.base_model)))
    )
    try:
        loss_of(model, classification_batches()[0]).backward()
        opt.step()
    finally:
        handle.remove()
    assert [o for o, _ in seen] == [base, opt]  # the base's update, then the masked step
    assert same_state(seen[1][1], snapshot(model.base_model))
    assert not same_state(seen[0][1], seen[1][1])  # update masking pulled parameters back


def test_optimizer_created_after_begin_task_does_not_grow():
    net = multi_head()
    model = get_softmask_model(net, SoftMaskConfig())
    model.begin_task(0, num_classes=3)
    opt = SoftMaskOptimizer(torch.optim.SGD(net.backbone.parameters(), lr=0.1), model)
    h0 = [p.detach().clone() for p in net.heads[0].parameters()]
    loss_of(model, classification_batches()[0]).backward()
    opt.step()
    assert len(opt.param_groups[0]["params"]) == 2
    assert all(torch.equal(p, q) for p, q in zip(net.heads[0].parameters(), h0))


def test_state_dict_hooks_reach_the_base_optimizer():
    model = model_at_task_one()
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(sorted(sd)))
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load"))
    opt.load_state_dict(opt.state_dict())
    assert seen == [["param_groups", "state"], "load"]


def test_lbfgs_closure_is_passed_through_and_masked():
    """LBFGS needs the closure; grads are masked after every evaluation (A = 1 never moves)."""
    net = nn.Linear(4, 3)
    model = get_softmask_model(net, SoftMaskConfig(mask_mode="grad"))
    frozen = model.masked_parameter_names[0]
    seed_importance(
        model, {n: float(n == frozen) * torch.ones_like(p) for n, p in net.named_parameters()}
    )
    model.begin_task(1)
    before = dict(net.named_parameters())[frozen].detach().clone()
    with pytest.warns(
        UserWarning, match="adaptive optimizers rescale"
    ):  # grad mode, LBFGS: masked anyway
        opt = SoftMaskOptimizer(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5), model)
    batch = classification_batches()[0]
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and len(calls) > 1
    assert torch.equal(dict(net.named_parameters())[frozen].detach(), before)
    others = [p for n, p in net.named_parameters() if n != frozen]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in others)


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_masks_follow_the_model_to_another_dtype(mode):
    model = model_at_task_one()
    model.to(torch.float64)
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, mask_mode=mode)
    x, y = classification_batches()[0]
    loss_of(model, (x.double(), y)).backward()
    opt.step()
    assert all(k.dtype == torch.float64 for g in model.keep_masks.groups for k in g.keep)


def test_a_deep_copy_masks_its_own_copy_of_the_model():
    model = model_at_task_one()
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    clone_model, clone = copy.deepcopy((model, opt))
    before = snapshot(model.base_model)
    w0 = clone_model.base_model.weight.detach().clone()
    clone.zero_grad()
    loss_of(clone_model, classification_batches()[0]).backward()
    g = clone_model.base_model.weight.grad.clone()
    clone.step()
    assert same_state(snapshot(model.base_model), before)  # the original is untouched
    torch.testing.assert_close(clone_model.base_model.weight.detach(), w0 - 0.1 * 0.5 * g)
