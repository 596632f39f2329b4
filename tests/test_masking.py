"""Soft-masking around the optimizer step, with importance set by hand.

Gradients are assigned by hand each step, so a masked model and a plain twin see the same
gradients and their trajectories can be compared element by element.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from helpers import multi_head
from torch import Tensor, nn

from softmask_peft import SoftMaskConfig, SoftMaskOptimizer, get_softmask_model
from softmask_peft.masking import build_keep_masks
from softmask_peft.testing import seed_importance

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adamw_wd": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
}


def adaptive_grad_warning(mode: str):
    """Grad masking under an adaptive optimizer warns (tested on purpose here); update does not."""
    if mode == "grad":
        return pytest.warns(UserWarning, match="adaptive optimizers rescale")
    return contextlib.nullcontext()


def with_importance(
    net: nn.Module, importance: dict[str, Tensor], mode: str, classes=None, **config
):
    """A SoftMaskModel at task 1 whose accumulated importance is exactly `importance`."""
    model = get_softmask_model(net, SoftMaskConfig(mask_mode=mode, **config))
    model.begin_task(0, num_classes=classes)
    seed_importance(model, importance)
    model.begin_task(1, num_classes=classes)
    return model


def random_grads(params: list[Tensor], gen: torch.Generator) -> list[Tensor]:
    return [torch.randn(p.shape, generator=gen) for p in params]


def set_grads(params: list[Tensor], grads: list[Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_update_mode_freezes_a_one_and_leaves_a_zero_exact(opt_name):
    net = nn.Linear(4, 3)
    twin = copy.deepcopy(net)
    w0 = net.weight.detach().clone()
    model = with_importance(
        net, {"weight": torch.ones(3, 4), "bias": torch.zeros(3)}, mode="update"
    )
    opt = SoftMaskOptimizer(OPTIMIZERS[opt_name](model.parameters()), model)
    plain = OPTIMIZERS[opt_name](twin.parameters())
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        grads = random_grads([net.weight, net.bias], gen)
        set_grads([net.weight, net.bias], grads)
        set_grads([twin.weight, twin.bias], grads)
        opt.step()
        plain.step()
        assert torch.equal(net.weight, w0)  # A = 1: not a single bit moves
        assert torch.equal(net.bias, twin.bias)  # A = 0: exactly the plain optimizer
    assert not torch.equal(twin.weight, w0)  # the plain optimizer did move it


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_a_zero_everywhere_is_bit_exact_plain_adamw(mode):
    net = nn.Linear(4, 3)
    twin = copy.deepcopy(net)
    model = with_importance(net, {"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}, mode)
    with adaptive_grad_warning(mode):
        opt = SoftMaskOptimizer(OPTIMIZERS["adamw_wd"](model.parameters()), model)
    plain = OPTIMIZERS["adamw_wd"](twin.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        grads = random_grads([net.weight, net.bias], gen)
        set_grads(list(net.parameters()), grads)
        set_grads(list(twin.parameters()), grads)
        opt.step()
        plain.step()
    assert torch.equal(net.weight, twin.weight) and torch.equal(net.bias, twin.bias)


def test_grad_mode_is_the_paper_under_plain_sgd():
    net = nn.Linear(4, 3)
    A = {"weight": torch.rand(3, 4), "bias": torch.tensor([0.0, 0.5, 1.0])}
    model = with_importance(net, A, mode="grad")
    lr = 0.3
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=lr), model)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        p0 = {n: p.detach().double().clone() for n, p in net.named_parameters()}
        grads = random_grads([net.weight, net.bias], gen)
        set_grads([net.weight, net.bias], grads)
        opt.step()
        for (n, p), g in zip(net.named_parameters(), grads):
            expected = p0[n] - lr * (1 - A[n].double()) * g.double()
            torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-6)
    # the masked gradient is what the optimizer saw
    torch.testing.assert_close(net.bias.grad, grads[1] * (1 - A["bias"]))


def test_grad_mode_freezes_a_one_under_sgd():
    net = nn.Linear(4, 3)
    w0 = net.weight.detach().clone()
    model = with_importance(net, {"weight": torch.ones(3, 4), "bias": torch.zeros(3)}, "grad")
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model)
    set_grads([net.weight, net.bias], [torch.ones(3, 4), torch.ones(3)])
    opt.step()
    assert torch.equal(net.weight, w0)


def test_update_mode_scales_one_adam_step_by_keep():
    net = nn.Linear(4, 3)
    twin = copy.deepcopy(net)
    A = {"weight": torch.rand(3, 4), "bias": torch.rand(3)}
    model = with_importance(net, A, mode="update")
    opt = SoftMaskOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), model)
    plain = torch.optim.Adam(twin.parameters(), lr=0.1)
    p0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    grads = random_grads([net.weight, net.bias], torch.Generator().manual_seed(3))
    set_grads(list(net.parameters()), grads)
    set_grads(list(twin.parameters()), grads)
    opt.step()
    plain.step()
    for (n, p), q in zip(net.named_parameters(), twin.parameters()):
        expected = p0[n] + (1 - A[n]) * (q.detach() - p0[n])
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


def test_task_zero_is_unmasked():
    net = multi_head()
    twin = copy.deepcopy(net)
    model = get_softmask_model(net, SoftMaskConfig())
    model.begin_task(0, num_classes=3)
    twin.add_head(3)
    twin.heads[0].load_state_dict(net.heads[0].state_dict())
    assert model.keep_masks.groups == [] and model.head_keep() == 1.0
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5), model)
    plain = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.5)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        grads = random_grads(list(net.parameters()), gen)
        set_grads(list(net.parameters()), grads)
        set_grads(list(twin.parameters()), grads)
        opt.step()
        plain.step()
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_head_keep_is_element_weighted_mean():
    # backbone.weight: 20 elements at 1.0; backbone.bias: 5 elements at 0.0
    # element-weighted mean = 20/25 = 0.8 (the mean of the two means would be 0.5)
    net = multi_head(in_features=4, feature_dim=5)
    A = {"backbone.weight": torch.ones(5, 4), "backbone.bias": torch.zeros(5)}
    model = with_importance(net, A, mode="grad", classes=2)
    assert model.head_keep() == pytest.approx(0.2, abs=1e-12)
    masks = build_keep_masks(dict(net.named_parameters()), A, [])
    assert masks.head_keep == pytest.approx(0.2, abs=1e-12)


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_heads_scaled_by_one_minus_mean_importance(mode):
    net = multi_head(in_features=4, feature_dim=5)
    A = {"backbone.weight": torch.rand(5, 4), "backbone.bias": torch.rand(5)}
    a_bar = float(torch.cat([A["backbone.weight"].flatten(), A["backbone.bias"]]).double().mean())
    model = with_importance(net, A, mode=mode, classes=2, head_scaling="all")  # official
    assert model.head_parameter_names == [
        "heads.0.weight",
        "heads.0.bias",
        "heads.1.weight",
        "heads.1.bias",
    ]
    assert model.head_keep() == pytest.approx(1 - a_bar, abs=1e-7)
    lr = 0.2
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=lr), model)
    head_params = [dict(net.named_parameters())[n] for n in model.head_parameter_names]
    before = [p.detach().double().clone() for p in head_params]
    grads = random_grads(list(net.parameters()), torch.Generator().manual_seed(5))
    set_grads(list(net.parameters()), grads)
    head_grads = {id(p): g for p, g in zip(net.parameters(), grads)}
    opt.step()
    for p, p0 in zip(head_params, before):
        expected = p0 - lr * (1 - a_bar) * head_grads[id(p)].double()
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-6)


class MixedPrecision(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(3))
        self.b = nn.Parameter(torch.randn(4, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_parameters_of_different_dtypes_are_each_masked(mode):
    net = MixedPrecision()
    A = {"a": torch.tensor([1.0, 0.0, 0.5]), "b": torch.tensor([0.0, 1.0, 0.25, 1.0])}
    model = with_importance(net, A, mode=mode)
    lr = 0.1
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=lr), model)
    before = {n: p.detach().double().clone() for n, p in net.named_parameters()}
    net.a.grad = torch.ones(3)
    net.b.grad = torch.ones(4, dtype=torch.float64)
    opt.step()
    assert net.b.dtype == torch.float64
    for n, p in net.named_parameters():
        torch.testing.assert_close(
            p.detach().double(), before[n] - lr * (1 - A[n].double()), rtol=0, atol=1e-7
        )


def test_parameter_without_grad_is_skipped():
    net = nn.Linear(4, 3)
    model = with_importance(net, {"weight": torch.rand(3, 4), "bias": torch.rand(3)}, "grad")
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    b0 = net.bias.detach().clone()
    net.weight.grad = torch.ones(3, 4)
    opt.step()
    assert net.bias.grad is None and torch.equal(net.bias, b0)


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_earlier_heads_without_gradients_do_not_drift(mode):
    net = multi_head(in_features=4, feature_dim=16)
    A = {"backbone.weight": torch.rand(16, 4), "backbone.bias": torch.rand(16)}
    model = with_importance(net, A, mode=mode, classes=7)
    assert 0 < model.head_keep() < 1
    with adaptive_grad_warning(mode):
        opt = SoftMaskOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1), model)
    old = [p.detach().clone() for p in net.heads[0].parameters()]
    gen = torch.Generator().manual_seed(6)
    for _ in range(50):
        opt.zero_grad()
        set_grads(
            list(net.heads[1].parameters()), random_grads(list(net.heads[1].parameters()), gen)
        )
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(net.heads[0].parameters(), old))


def _one_sgd_step(model, net: nn.Module, lr: float, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """One masked SGD step on random gradients: {name: (parameter before, its gradient)}."""
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=lr), model)
    params = dict(net.named_parameters())
    grads = random_grads(list(params.values()), torch.Generator().manual_seed(seed))
    before = {
        n: (p.detach().double().clone(), g.double()) for (n, p), g in zip(params.items(), grads)
    }
    set_grads(list(params.values()), grads)
    opt.step()
    return before


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_except_new_leaves_only_the_new_head_unscaled(mode):
    net = multi_head(in_features=4, feature_dim=5)
    A = {"backbone.weight": torch.rand(5, 4), "backbone.bias": torch.rand(5)}
    a_bar = float(torch.cat([A["backbone.weight"].flatten(), A["backbone.bias"]]).double().mean())
    model = with_importance(net, A, mode=mode, classes=2, head_scaling="except_new")
    lr = 0.2
    before = _one_sgd_step(model, net, lr, seed=7)
    params = dict(net.named_parameters())
    for name, scale in (
        ("heads.1.weight", 1.0),  # the current task's new head: unscaled
        ("heads.1.bias", 1.0),
        ("heads.0.weight", 1 - a_bar),  # an earlier head keeps the official scale
        ("heads.0.bias", 1 - a_bar),
    ):
        p0, g = before[name]
        torch.testing.assert_close(
            params[name].detach().double(), p0 - lr * scale * g, rtol=0, atol=1e-6
        )
    assert model.head_keep() == pytest.approx(1 - a_bar, abs=1e-7)


@pytest.mark.parametrize("head_scaling", ["all", "except_new"])
def test_a_shared_head_is_scaled_in_both_modes(head_scaling):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    A = {"0.weight": torch.rand(5, 4), "0.bias": torch.rand(5)}
    a_bar = float(torch.cat([A["0.weight"].flatten(), A["0.bias"]]).double().mean())
    model = with_importance(net, A, mode="grad", head_modules=["1"], head_scaling=head_scaling)
    before = _one_sgd_step(model, net, 0.2, seed=8)
    for name in ("1.weight", "1.bias"):
        p0, g = before[name]
        expected = p0 - 0.2 * (1 - a_bar) * g
        torch.testing.assert_close(
            dict(net.named_parameters())[name].detach().double(), expected, rtol=0, atol=1e-6
        )


def test_except_new_scales_the_head_again_once_a_later_task_begins():
    net = multi_head(in_features=4, feature_dim=5)
    A = {"backbone.weight": torch.rand(5, 4), "backbone.bias": torch.rand(5)}
    model = with_importance(net, A, mode="grad", classes=2, head_scaling="except_new")
    assert [id(p) for p in model.keep_masks.heads] == [id(p) for p in net.heads[0].parameters()]
    seed_importance(model, A)
    model.begin_task(2, num_classes=2)
    scaled = [id(p) for h in (0, 1) for p in net.heads[h].parameters()]
    assert [id(p) for p in model.keep_masks.heads] == scaled
