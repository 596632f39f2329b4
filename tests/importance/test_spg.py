"""SPG importance against closed-form gradients computed in the test.

Every model here uses the paper's accumulation (`PAPER_CAPACITY`): the closed forms are the
official code's; the capacity options are tested in tests/test_capacity.py.

Linear models give every gradient by hand: for logits = W x + b and the batch-mean CE,
dL/dlogits = (softmax - onehot) / B; for the sum of a head's logits, dL/dz = W_hᵀ 1.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    classification_batches,
    multi_head,
    small_mlp,
    snapshot,
    standardize_tanh_abs,
    text_batches,
    tiny_bert,
)
from torch import Tensor, nn

from softmask_peft import (
    BatchError,
    EmptyDataError,
    NonFiniteGradientError,
    SoftMaskConfig,
    get_softmask_model,
)
from softmask_peft.config import PAPER_CAPACITY
from softmask_peft.heads import MultiHeadClassifier
from softmask_peft.importance import spg as spg_module
from softmask_peft.testing import seed_importance


def norm_ref(g: Tensor) -> Tensor:
    """Reference SPG normalisation incl. the guards (all-zero / one element / zero std -> 0)."""
    g = g.to(torch.float64)
    if g.numel() < 2 or bool((g == g.flatten()[0]).all()):
        return torch.zeros_like(g)
    return standardize_tanh_abs(g)


def ce_dlogits(logits: Tensor, y: Tensor) -> Tensor:
    """d mean-CE / d logits = (softmax - onehot) / B."""
    p = torch.softmax(logits.double(), dim=1)
    return (p - F.one_hot(y, logits.shape[1]).double()) / logits.shape[0]


def assert_importance_close(got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), expected[k], rtol=0, atol=2e-6, msg=k)


# plain single-head model -------------------------------------------------------------------


def test_plain_linear_importance_closed_form():
    torch.manual_seed(3)
    net = nn.Linear(4, 3)
    batches = classification_batches(n=10, batch_size=4)  # uneven last batch (2)
    W, b = net.weight.detach().double(), net.bias.detach().double()
    gW, gb = torch.zeros_like(W), torch.zeros_like(b)
    for x, y in batches:
        d = ce_dlogits(x.double() @ W.T + b, y)
        gW += d.T @ x.double()
        gb += d.sum(0)
    model = get_softmask_model(net, SoftMaskConfig(**PAPER_CAPACITY))
    model.begin_task(0)
    model.end_task(batches)
    assert model.masked_parameter_names == ["weight", "bias"]
    assert_importance_close(model.importance, {"weight": norm_ref(gW), "bias": norm_ref(gb)})
    assert_importance_close(
        model.task_importance(0), {"weight": norm_ref(gW), "bias": norm_ref(gb)}
    )
    assert model.num_tasks == 1


class ScaledLinear(nn.Module):
    """logits = s (W x + b) with a one-element scale s and a parameter the forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.tensor([1.5]))
        self.unused = nn.Parameter(torch.randn(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) * self.scale


def test_unused_and_one_element_parameters_get_zero_importance():
    net = ScaledLinear()
    batches = classification_batches(n=8)
    W, b = net.fc.weight.detach().double(), net.fc.bias.detach().double()
    gW = torch.zeros_like(W)
    for x, y in batches:
        d = ce_dlogits(1.5 * (x.double() @ W.T + b), y) * 1.5
        gW += d.T @ x.double()
    model = get_softmask_model(net, SoftMaskConfig(**PAPER_CAPACITY))
    model.begin_task(0)
    model.end_task(batches)
    imp = model.importance
    assert torch.equal(imp["unused"], torch.zeros(5))  # all-zero gradient
    assert torch.equal(imp["scale"], torch.zeros(1))  # one element: std undefined
    assert bool(torch.isfinite(imp["fc.weight"]).all())
    torch.testing.assert_close(imp["fc.weight"].double(), norm_ref(gW), rtol=0, atol=2e-6)


class SharedScale(nn.Module):
    """logits = (W x + b) * Σ s: every s_i gets the same (non-zero) gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.s = nn.Parameter(torch.full((4,), 0.25))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) * self.s.sum()


def test_constant_nonzero_gradient_has_zero_std_and_gets_zero_importance():
    net = SharedScale()
    batches = classification_batches(n=8)
    W, b = net.fc.weight.detach().double(), net.fc.bias.detach().double()
    gs = sum(
        float((ce_dlogits(x.double() @ W.T + b, y) * (x.double() @ W.T + b)).sum())
        for x, y in batches
    )
    assert abs(gs) > 1e-3  # the gradient of each s_i is this same non-zero number
    model = get_softmask_model(net, SoftMaskConfig(**PAPER_CAPACITY))
    model.begin_task(0)
    model.end_task(batches)
    assert torch.equal(model.importance["s"], torch.zeros(4))
    assert float(model.importance["fc.weight"].max()) > 0


# multi-head: max over heads, cross-head sum-of-logits term ----------------------------------


def reference_multi_head(model_net, batches, task: int) -> tuple[dict[str, Tensor], list]:
    """Closed-form γ^t for a MultiHeadClassifier on a linear backbone z = V x + c.

    Head h < t: L_h = Σ logits_h, so dL/dz_b = W_hᵀ 1 for every row b.
    Head t: dL/dz = (softmax - onehot)/B · W_t.  dV = Σ dzᵀ x, dc = Σ dz.
    Returns the per-task importance and the per-head normalised importances.
    """
    V = model_net.backbone.weight.detach().double()
    c = model_net.backbone.bias.detach().double()
    heads = [(h.weight.detach().double(), h.bias.detach().double()) for h in model_net.heads]
    gV = [torch.zeros_like(V) for _ in range(task + 1)]
    gc = [torch.zeros_like(c) for _ in range(task + 1)]
    for x, y in batches:
        x = x.double()
        z = x @ V.T + c
        for h in range(task + 1):
            Wh, bh = heads[h]
            cross_head = Wh.sum(0).expand(x.shape[0], -1)
            dz = cross_head if h < task else ce_dlogits(z @ Wh.T + bh, y) @ Wh
            gV[h] += dz.T @ x
            gc[h] += dz.sum(0)
    per_head = [
        {"backbone.weight": norm_ref(gV[h]), "backbone.bias": norm_ref(gc[h])}
        for h in range(task + 1)
    ]
    task_imp = {
        k: torch.stack([ph[k] for ph in per_head]).amax(0)
        for k in ("backbone.weight", "backbone.bias")
    }
    return task_imp, per_head


def train_a_little(model, batches, steps: int = 3, lr: float = 0.2) -> None:
    from softmask_peft import SoftMaskOptimizer

    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=lr), model)
    for _ in range(steps):
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()


def test_multi_head_three_tasks_closed_form_max_over_heads_and_tasks():
    net = multi_head(in_features=4, feature_dim=5)
    model = get_softmask_model(net, SoftMaskConfig(**PAPER_CAPACITY))
    assert model.masked_parameter_names == ["backbone.weight", "backbone.bias"]
    classes = [2, 3, 4]
    refs = []
    for t, n in enumerate(classes):
        batches = classification_batches(n=9, num_classes=n, batch_size=4, seed=10 + t)
        model.begin_task(t, num_classes=n)
        train_a_little(model, batches)
        ref, per_head = reference_multi_head(net, batches, t)
        got = model.end_task(batches)
        assert_importance_close(got, ref)
        refs.append(ref)
        if t == 2:
            # the max genuinely mixes heads: each head wins somewhere
            w = got["backbone.weight"].double()
            for ph in per_head:
                assert bool((torch.isclose(w, ph["backbone.weight"], atol=1e-6)).any())
            assert not torch.allclose(
                per_head[0]["backbone.weight"], per_head[2]["backbone.weight"]
            )
    # per-task history kept, accumulation is the elementwise max over tasks
    for t in range(3):
        assert_importance_close(model.task_importance(t), refs[t])
    acc = {k: torch.stack([r[k] for r in refs]).amax(0) for k in refs[0]}
    assert_importance_close(model.importance, acc)
    assert model.num_tasks == 3


def test_importance_pass_leaves_weights_grads_and_mode_alone():
    net = multi_head()
    model = get_softmask_model(net, SoftMaskConfig(**PAPER_CAPACITY))
    model.begin_task(0, num_classes=3)
    model.eval()
    before = snapshot(net)
    model.end_task(classification_batches())
    assert all(p.grad is None for p in net.parameters())
    assert not net.training
    after = snapshot(net)
    assert all(torch.equal(before[k], after[k]) for k in before)


class ModeRecorder(nn.Module):
    """Records `self.training` at every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.modes: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.modes.append(self.training)
        return self.fc(x)


def test_importance_pass_runs_in_train_mode_over_every_batch():
    net = ModeRecorder().eval()
    model = get_softmask_model(net, SoftMaskConfig(**PAPER_CAPACITY))
    model.begin_task(0)
    model.end_task(classification_batches(n=12, batch_size=4))
    assert net.modes == [True, True, True]
    assert not net.training


def hand_loop_importance(net, batches, task: int, seeded: bool = False) -> dict[str, Tensor]:
    """Per-head torch.autograd.grad loop (the official code's structure), our own normalisation.

    `seeded`: every forward of batch b seeded like `_importance_with_dropout_seeds` (same
    dropout masks)."""
    names = [n for n, _ in net.named_parameters() if not n.startswith("heads.")]
    params = [dict(net.named_parameters())[n] for n in names]
    sums = [[torch.zeros_like(p, dtype=torch.float64) for p in params] for _ in range(task + 1)]
    for b, (x, y) in enumerate(batches):
        for h in range(task + 1):
            if seeded:
                torch.manual_seed(100 + b)
            logits = net.heads[h](net.backbone(x))
            loss = logits.sum() if h < task else F.cross_entropy(logits, y)
            for s, g in zip(sums[h], torch.autograd.grad(loss, params)):
                s += g.double()
    return {
        n: torch.stack([norm_ref(sums[h][i]) for h in range(task + 1)]).amax(0)
        for i, n in enumerate(names)
    }


def test_batched_backward_equals_per_head_loop():
    batches = classification_batches(n=10, num_classes=3, batch_size=3, seed=4)
    nets, results = [], []
    modes = ((True, True), (False, True), (True, False))  # (batched backward, factored layer)
    for batched, factored in modes:
        net = multi_head(backbone="mlp", seed=5)
        model = get_softmask_model(net, SoftMaskConfig(**PAPER_CAPACITY))
        for t in range(2):
            model.begin_task(t, num_classes=3)
            seed_importance(model, {n: torch.zeros_like(p) for n, p in _masked(model)})
        model.begin_task(2, num_classes=3)
        method = model.method
        state = method.start(2)
        state.batched_backward, state.factored_last_layer = batched, factored
        for b in batches:
            state = method.add(state, b)
        assert state.batched_backward is batched
        results.append(method.result(state))
        nets.append(net)
    expected = hand_loop_importance(nets[0], batches, 2)
    for result in results:
        assert_importance_close(result, expected)


def _importance_with_dropout_seeds(net, batches, task: int) -> dict[str, Tensor]:
    """Our pass with the RNG seeded per batch, so a hand loop can replay the dropout masks."""
    model = get_softmask_model(net, SoftMaskConfig(**PAPER_CAPACITY))
    for t in range(task):
        model.begin_task(t, num_classes=3)
        seed_importance(model, {n: torch.zeros_like(p) for n, p in _masked(model)})
    model.begin_task(task, num_classes=3)
    state = model.method.start(task)
    for b, batch in enumerate(batches):
        torch.manual_seed(100 + b)
        state = model.method.add(state, batch)
    return model.method.result(state)


def _relu_dropout_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Dropout(0.3), nn.Identity()
    )


class FlippedFeatures(nn.Module):
    """z = flip(relu(V x)): a functional, not element-wise op after the last module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(4, 5), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.fc(x)).flip(-1)


class ReusedLastLayer(nn.Module):
    """The last linear layer's weight read twice: called twice, or also used functionally."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.fc0, self.fc, self.act = nn.Linear(4, 5), nn.Linear(5, 5), nn.ReLU()
        self.functional = functional

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc0(x))
        h = torch.tanh(F.linear(h, self.fc.weight) if self.functional else self.fc(h))
        return self.act(self.fc(h))  # the tail alone would pass: Linear then ReLU


class DoubledLinear(nn.Linear):
    """A Linear subclass that computes otherwise: u = 2 (a Wᵀ + b)."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)


NOT_FACTORED = {
    "linear_subclass": lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), DoubledLinear(5, 5)),
    "called_twice": lambda: ReusedLastLayer(functional=False),
    "weight_also_used_functionally": lambda: ReusedLastLayer(functional=True),
    "layer_norm": lambda: nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5)),
    "softmax": lambda: nn.Sequential(nn.Linear(4, 5), nn.Softmax(dim=-1)),
    "in_place_relu": lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True)),
    "functional_flip": FlippedFeatures,
}


def _tail_linear(backbone: nn.Module, x: Tensor):
    with spg_module._LinearTail(backbone) as tail:
        z = backbone(x)
    found = tail.last_linear(z)
    return None if found is None else found[0]


def test_factored_last_layer_equals_per_head_loop_with_relu_and_dropout():
    torch.manual_seed(6)
    net = MultiHeadClassifier(_relu_dropout_mlp(), 5)
    batches = classification_batches(n=11, num_classes=3, batch_size=4, seed=8)
    assert _tail_linear(net.backbone, batches[0][0]) is net.backbone[2]  # the fast path applies
    got = _importance_with_dropout_seeds(net, batches, 2)
    assert_importance_close(got, hand_loop_importance(net, batches, 2, seeded=True))
    assert float(got["backbone.2.weight"].max()) > 0.5  # a real signal, not all zeros


@pytest.mark.parametrize("kind", sorted(NOT_FACTORED))
def test_backbones_the_factored_path_must_not_take_still_match_the_loop(kind):
    torch.manual_seed(7)
    net = MultiHeadClassifier(NOT_FACTORED[kind](), 5)
    batches = classification_batches(n=10, num_classes=3, batch_size=4, seed=9)
    assert _tail_linear(net.backbone, batches[0][0]) is None
    got = _importance_with_dropout_seeds(net, batches, 2)
    assert_importance_close(got, hand_loop_importance(net, batches, 2, seeded=True))


def _masked(model):
    params = dict(model.base_model.named_parameters())
    return [(n, params[n]) for n in model.masked_parameter_names]


# Hugging Face dict batches ---------------------------------------------------------------


def test_hf_dict_batches_use_the_model_loss():
    net = tiny_bert(num_labels=3)
    batches = text_batches(n=8, num_labels=3)
    model = get_softmask_model(
        net, SoftMaskConfig(target_modules=["query", "value"], head_modules=["classifier"], **PAPER_CAPACITY)
    )
    names = model.masked_parameter_names
    params = dict(net.named_parameters())
    sums = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    net.train()
    for b in batches:
        grads = torch.autograd.grad(net(**b).loss, [params[n] for n in names])
        for n, g in zip(names, grads):
            sums[n] += g.double()
    net.eval()
    model.begin_task(0)
    model.end_task(batches)
    assert_importance_close(model.importance, {n: norm_ref(s) for n, s in sums.items()})


class FixedGradient(nn.Module):
    """loss = Σ w · c, so every batch's gradient is c = (1, 0.7, 0.3, 0.1) in the model's dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4, dtype=dtype))

    def forward(self, input_ids: Tensor, labels: Tensor) -> SimpleNamespace:
        c = torch.tensor([1.0, 0.7, 0.3, 0.1], dtype=self.w.dtype)
        return SimpleNamespace(loss=(self.w * c).sum())


def test_low_precision_models_sum_gradients_in_float32():
    batches = [{"input_ids": torch.zeros(1, 1), "labels": torch.zeros(1)}] * 600
    model = get_softmask_model(FixedGradient(torch.bfloat16), SoftMaskConfig(**PAPER_CAPACITY))
    model.begin_task(0)
    got = model.end_task(batches)["w"]  # bfloat16 sums would stall at 256, 256, 128, 32
    expected = norm_ref(600 * torch.tensor([1.0, 0.7, 0.3, 0.1]).bfloat16().double())
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-6)


# errors and determinism ----------------------------------------------------------------------


def test_end_task_on_empty_loader_raises_and_records_nothing():
    model = get_softmask_model(small_mlp(), SoftMaskConfig(**PAPER_CAPACITY))
    model.begin_task(0)
    with pytest.raises(EmptyDataError, match="no batches"):
        model.end_task([])
    assert model.num_tasks == 0 and model.importance == {}


def test_non_finite_gradients_raise_naming_the_parameters_and_record_nothing():
    net = nn.Linear(4, 3)
    model = get_softmask_model(net, SoftMaskConfig(**PAPER_CAPACITY))
    model.begin_task(0)
    good = classification_batches(n=8)
    bad = [good[0], (torch.full((4, 4), float("inf")), good[1][1])]
    with pytest.raises(NonFiniteGradientError, match="weight"):
        model.end_task(bad)
    assert model.num_tasks == 0 and model.importance == {}
    # nothing damaged: the same task can still be finished on clean data
    model.end_task(good)
    assert model.num_tasks == 1


def test_dict_batch_without_labels_is_refused():
    net = tiny_bert()
    model = get_softmask_model(net, SoftMaskConfig(head_modules=["classifier"], **PAPER_CAPACITY))
    model.begin_task(0)
    batch = {k: v for k, v in text_batches()[0].items() if k != "labels"}
    with pytest.raises(BatchError, match="labels"):
        model.end_task([batch])
    assert model.num_tasks == 0


def test_batch_of_the_wrong_shape_is_refused():
    model = get_softmask_model(nn.Linear(4, 3), SoftMaskConfig(**PAPER_CAPACITY))
    model.begin_task(0)
    x, y = classification_batches()[0]
    with pytest.raises(BatchError, match=r"\(inputs, labels\) or a mapping.*got a 3-tuple"):
        model.end_task([(x, y, y)])
    assert model.num_tasks == 0


@pytest.mark.parametrize("labels", [[0, 3], [-1, 0], [0.0, 1.0]])
def test_labels_that_are_not_class_indices_are_refused(labels):
    model = get_softmask_model(nn.Linear(4, 3), SoftMaskConfig(**PAPER_CAPACITY))
    model.begin_task(0)
    with pytest.raises(BatchError, match="labels must"):
        model.end_task([(torch.zeros(2, 4), torch.tensor(labels))])
    with pytest.raises(BatchError, match="labels must"):
        model.training_loss((torch.zeros(2, 4), torch.tensor(labels)))
    assert model.num_tasks == 0


def test_end_task_accepts_a_torch_dataloader():
    from torch.utils.data import DataLoader, TensorDataset

    batches = classification_batches(n=10, batch_size=4)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    net = nn.Linear(4, 3)
    model = get_softmask_model(net, SoftMaskConfig(**PAPER_CAPACITY))
    model.begin_task(0)
    got = model.end_task(DataLoader(TensorDataset(x, y), batch_size=4))  # batches are [x, y] lists
    W, b = net.weight.detach().double(), net.bias.detach().double()
    gW = sum(ce_dlogits(xb.double() @ W.T + b, yb).T @ xb.double() for xb, yb in batches)
    torch.testing.assert_close(got["weight"].double(), norm_ref(gW), rtol=0, atol=2e-6)


def test_end_task_inside_no_grad_still_computes_importance():
    net = nn.Linear(4, 3)
    model = get_softmask_model(net, SoftMaskConfig(**PAPER_CAPACITY))
    model.begin_task(0)
    batches = classification_batches()
    with torch.no_grad():
        got = model.end_task(batches)
    W, b = net.weight.detach().double(), net.bias.detach().double()
    gW = sum(ce_dlogits(xb.double() @ W.T + b, yb).T @ xb.double() for xb, yb in batches)
    torch.testing.assert_close(got["weight"].double(), norm_ref(gW), rtol=0, atol=2e-6)


def run_once(seed: int) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    net = small_mlp(seed=seed, in_features=4, p=0.3)
    model = get_softmask_model(net, SoftMaskConfig(**PAPER_CAPACITY))
    batches = classification_batches(n=16, batch_size=4, seed=seed)
    model.begin_task(0)
    train_a_little(model, batches, steps=2)
    model.end_task(batches)  # dropout is active in the importance pass: RNG matters
    return model.importance


def test_same_seed_gives_bit_identical_importance():
    a, b = run_once(7), run_once(7)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = run_once(8)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_task_adapters_keep_the_factored_path_equal_to_plain_autograd():
    """With task adapters the last linear's output carries the routed adapter's term; the
    factored last-layer path must still give the plain autograd gradients."""
    batches = classification_batches(n=10, num_classes=3, batch_size=4, seed=3)
    results = []
    for factored in (True, False):
        torch.manual_seed(11)
        backbone = nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 5), nn.Tanh())
        net = MultiHeadClassifier(backbone, 5, adapter_rank=2)
        model = get_softmask_model(net, SoftMaskConfig(**PAPER_CAPACITY))
        for t in range(2):
            model.begin_task(t, num_classes=3)
            seed_importance(model, {n: torch.zeros_like(p) for n, p in _masked(model)})
        model.begin_task(2, num_classes=3)
        with torch.no_grad():
            for p in net.task_adapters.parameters():
                p.normal_(generator=torch.Generator().manual_seed(p.numel()))
        state = model.method.start(2)
        state.factored_last_layer = factored
        for b in batches:
            state = model.method.add(state, b)
        results.append(model.method.result(state))
    assert set(results[0]) == {"backbone.0.weight", "backbone.0.bias", "backbone.2.weight", "backbone.2.bias"}
    assert_importance_close(results[0], {k: v.double() for k, v in results[1].items()})
    assert float(results[0]["backbone.0.weight"].max()) > 0.5  # a real signal
