"""DAS importance: hand-made gradients, mask gradients vs weight gradients, proxy KL, masking,
contrastive pairing and persistence."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    ENDS_UNTRAINED,
    UINT8_A_TOL,
    standardize_tanh_abs,
    text_batches,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)
from safetensors import safe_open
from softmask_format.names import IMPORTANCE_NAME

from softmask_peft import (
    DASConfig,
    SoftMaskConfig,
    SoftMaskModel,
    SoftMaskOptimizer,
    get_softmask_model,
)
from softmask_peft.contrastive import info_nce, mean_pool
from softmask_peft.errors import ConfigError, EmptyDataError
from softmask_peft.importance.normalize import normalize_importance
from softmask_peft.testing import seed_importance
from softmask_peft.units import apply_virtual_masks, discover_units


def das_model(net, das: DASConfig | None = None, **cfg) -> SoftMaskModel:
    return get_softmask_model(net, SoftMaskConfig(method="das", method_config=das, **cfg))


def lm_batches(n: int = 8, seed: int = 2):
    """Causal-LM batches: labels are the input ids (the model shifts them)."""
    return [
        {
            "input_ids": b["input_ids"],
            "attention_mask": b["attention_mask"],
            "labels": b["input_ids"],
        }
        for b in text_batches(n=n, seed=seed)
    ]


def _unit_vectors(model, fill):
    return {k: fill(k, s) for k, s in model.method.importance_shapes().items()}


# normalisation and accumulation on hand-made gradients ---------------------------------------


def test_raw_importance_sums_absolute_gradients_over_batches_divided_by_tokens():
    model = das_model(tiny_bert())
    shapes = model.method.importance_shapes()
    g = torch.Generator().manual_seed(3)
    g1 = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    g2 = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    state = model.method.start(0)
    state = model.method.add_gradients(state, g1, tokens=5)
    state = model.method.add_gradients(state, g2, tokens=3)
    raw = model.method.raw_importance(state)
    for k in shapes:
        assert torch.allclose(raw[k], (g1[k].abs() + g2[k].abs()) / 8)
    out = model.method.result(state)
    for k in shapes:  # one layer's units of one kind are standardised together
        assert torch.allclose(out[k], standardize_tanh_abs(raw[k]).float(), atol=1e-6)
    with pytest.raises(EmptyDataError):
        model.method.result(model.method.start(1))


def test_general_and_domain_importance_accumulate_by_max():
    model = das_model(tiny_bert())
    shapes = model.method.importance_shapes()
    general = {k: torch.linspace(0, 1, s[0]) for k, s in shapes.items()}
    model.set_general_importance(general)
    domains = []
    for t, seed in enumerate((4, 5)):
        g = torch.Generator().manual_seed(seed)
        grads = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        model.begin_task(t)
        state = model.method.add_gradients(model.method.start(t), grads, tokens=1)
        domain = {k: standardize_tanh_abs(grads[k].abs()).float() for k in shapes}
        seed_importance(model, model.method.result(state, model.store.general))
        domains.append(domain)
        for k in shapes:
            assert torch.allclose(model.task_importance(t)[k], torch.maximum(general[k], domain[k]))
    for k in shapes:
        expected = torch.maximum(general[k], torch.maximum(domains[0][k], domains[1][k]))
        assert torch.allclose(model.importance[k], expected)


# the real pass: mask gradients against weight gradients ---------------------------------------


def _mask_grads_from_weights(net, blocks, batch):
    """∂L/∂m at m = 1 from ordinary weight gradients, without hooks.

    Scaling head h's context by m equals scaling the output projection's columns that read it,
    so ∂L/∂m_h = Σ_{cols of h} W ⊙ ∂L/∂W; intermediate j: column j of down; output i: row i of
    down plus bias i.
    """
    net.zero_grad(set_to_none=True)
    net(**batch).loss.backward()
    out = {}
    for b in blocks:
        att = net.get_submodule(b.paths["attn_out"])
        down = net.get_submodule(b.paths["down"])
        wg = (att.weight * att.weight.grad).sum(dim=0)
        out[b.key("heads")] = wg.view(b.num_heads, b.head_dim).sum(dim=1)
        dg = down.weight * down.weight.grad
        out[b.key("intermediate")] = dg.sum(dim=0)
        out[b.key("output")] = dg.sum(dim=1) + down.bias * down.bias.grad
    net.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in out.items()}


def test_domain_pass_matches_weight_gradient_identity_and_zeroes_between_batches():
    net = tiny_bert(dropout=0.0)
    model = das_model(net)
    batches = text_batches(n=8, batch_size=4)
    blocks = model.method.blocks
    per_batch = [_mask_grads_from_weights(net, blocks, b) for b in batches]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    state = model.method.start(0)
    for b in batches:
        state = model.method.add(state, b)
    raw = model.method.raw_importance(state)
    for k in raw:
        expected = (per_batch[0][k].abs() + per_batch[1][k].abs()) / tokens
        assert torch.allclose(raw[k], expected, rtol=1e-3, atol=1e-12), k
    summed = {k: (per_batch[0][k] + per_batch[1][k]).abs() / tokens for k in raw}  # not zeroed
    assert not all(torch.allclose(raw[k], summed[k], rtol=1e-3, atol=1e-12) for k in raw)


@ENDS_UNTRAINED
def test_end_task_stores_normalised_units_per_layer():
    model = das_model(tiny_bert(dropout=0.0))
    model.begin_task(0, name="d0")
    imp = model.end_task(text_batches())
    assert set(imp) == set(model.method.importance_shapes())
    for v in imp.values():
        assert v.dim() == 1 and bool(((v >= 0) & (v <= 1)).all()) and v.max() > 0
    with pytest.raises(EmptyDataError):
        model.begin_task(1)
        model.end_task([])


# proxy KL --------------------------------------------------------------------------------------


def test_proxy_kl_is_positive_with_dropout_and_zero_without():
    batch = text_batches()[0]
    with_dropout = das_model(tiny_bert(dropout=0.3))
    with_dropout.train()
    assert float(with_dropout.method.proxy_kl(batch).detach()) > 1e-6
    without = das_model(tiny_bert(dropout=0.0))
    without.train()
    assert float(without.method.proxy_kl(batch).detach()) == 0.0


def test_proxy_kl_is_kl_of_softmaxed_pooled_states():
    model = das_model(tiny_bert(dropout=0.3))
    model.train()
    batch = text_batches()[0]
    torch.manual_seed(7)
    kl = model.method.proxy_kl(batch)
    torch.manual_seed(7)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    h = [model.base_model.bert(**inputs).last_hidden_state for _ in range(2)]
    m = inputs["attention_mask"].unsqueeze(-1).float()
    r = [(x * m).sum(1) / m.sum(1) for x in h]
    p, q = r[0].softmax(-1), r[1].softmax(-1)
    expected = (p * (p.log() - q.log())).sum()
    assert torch.allclose(kl, expected, rtol=1e-5)


def test_general_importance_runs_in_train_mode_and_restores_eval():
    net = tiny_bert(dropout=0.3).eval()
    model = das_model(net)
    general = model.general_importance(text_batches())
    assert not net.training
    assert set(general) == set(model.method.importance_shapes())
    assert any(float(v.max()) > 0 for v in general.values())


# models without dropout (issue 13) -------------------------------------------------------------


DROPOUT_FREE = {"llama": tiny_llama, "gpt2-dropout-0": lambda: tiny_gpt2(dropout=0.0)}  # Llama: dropout 0


@pytest.mark.parametrize("arch", sorted(DROPOUT_FREE))
def test_proxy_kl_without_dropout_is_exactly_zero_and_unit_dropout_makes_it_positive(arch):
    from softmask_peft.units import ones_masks

    model = das_model(DROPOUT_FREE[arch]())
    model.train()
    batch = lm_batches()[0]
    blocks = model.method.blocks
    masks = ones_masks(blocks, requires_grad=False)
    with torch.no_grad():
        assert float(model.method.proxy_kl(batch)) == 0.0
        with apply_virtual_masks(blocks, masks, dropout=0.1):
            assert float(model.method.proxy_kl(batch)) > 1e-6


@pytest.mark.parametrize("arch", [*sorted(DROPOUT_FREE), "gpt2-default"])
def test_general_importance_is_nonzero_on_llama_and_gpt2(arch):
    net = tiny_gpt2() if arch == "gpt2-default" else DROPOUT_FREE[arch]()
    model = das_model(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "importance is 0" warning
        general, rate = model.method.general_pass(lm_batches())
    assert all(float(v.max()) > 0.5 for v in general.values())
    # a default GPT-2 has dropout 0.1 of its own: the unit dropout stays off
    assert rate == (0.0 if arch == "gpt2-default" else 0.1)


def test_general_importance_with_unit_dropout_off_on_llama_is_zero_and_warns():
    model = das_model(tiny_llama(), DASConfig(unit_dropout="off"))
    with pytest.warns(RuntimeWarning, match="unit_dropout='off'.*Fix: set DASConfig"):
        general = model.general_importance(lm_batches())
    assert all(float(v.abs().max()) == 0.0 for v in general.values())


def test_unit_dropout_rate_is_configurable_and_can_be_forced_on():
    rates = {}
    for rate in (0.1, 0.3):
        model = das_model(tiny_bert(dropout=0.3), DASConfig(unit_dropout="on", unit_dropout_rate=rate))
        torch.manual_seed(3)
        rates[rate], used = model.method.general_pass(text_batches())
        assert used == rate
    auto = das_model(tiny_bert(dropout=0.3))
    torch.manual_seed(3)
    own, used = auto.method.general_pass(text_batches())
    assert used == 0.0
    for k in own:
        assert not torch.equal(rates[0.1][k], rates[0.3][k])
        assert not torch.equal(own[k], rates[0.1][k])


def _longhand_general_importance(net, batches, seed):
    """The proxy-KL pass of DAS 0.1 written out: own hooks, two dropout passes, |dKL/dm| / tokens."""
    torch.manual_seed(seed)
    net.train()
    layers = net.bert.encoder.layer
    sums, tokens = {}, 0
    for batch in batches:
        masks, handles = [], []
        for layer in layers:
            heads = torch.ones(2, requires_grad=True)
            inter = torch.ones(24, requires_grad=True)
            out = torch.ones(16, requires_grad=True)
            masks.append((heads, inter, out))
            handles += [
                layer.attention.output.dense.register_forward_pre_hook(
                    lambda m, a, h=heads: (a[0] * h.repeat_interleave(8),)
                ),
                layer.output.dense.register_forward_pre_hook(lambda m, a, i=inter: (a[0] * i,)),
                layer.output.dense.register_forward_hook(lambda m, a, y, o=out: y * o),
            ]
        att = batch["attention_mask"]
        pooled = []
        for _ in range(2):
            h = net.bert(input_ids=batch["input_ids"], attention_mask=att).last_hidden_state
            m = att.to(h.dtype).unsqueeze(-1)
            pooled.append((h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0))
        kl = F.kl_div(
            F.log_softmax(pooled[1], dim=-1), F.log_softmax(pooled[0], dim=-1),
            log_target=True, reduction="sum",
        )  # fmt: skip
        for hd in handles:
            hd.remove()
        flat = [t for triple in masks for t in triple]
        grads = torch.autograd.grad(kl, flat)
        names = [
            f"bert.encoder.layer.{i}.softmask_{k}"
            for i in range(len(layers))
            for k in ("heads", "intermediate", "output")
        ]
        for name, g in zip(names, grads):
            sums[name] = sums.get(name, torch.zeros_like(g)) + g.abs()
        tokens += int(att.sum())
    return {k: normalize_importance(v / tokens) for k, v in sums.items()}


def test_general_importance_of_a_model_with_dropout_is_unchanged_bit_for_bit():
    batches = text_batches(n=12)
    expected = _longhand_general_importance(tiny_bert(dropout=0.1), batches, seed=11)
    model = das_model(tiny_bert(dropout=0.1))
    torch.manual_seed(11)
    got, rate = model.method.general_pass(batches)
    assert rate == 0.0
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.equal(got[k], expected[k]), k
    assert any(float(v.max()) > 0 for v in got.values())


# unit -> parameter masking in training ---------------------------------------------------------

IMPORTANT = {"heads": 1, "intermediate": 5, "output": 3}


def _one_hot_importance(model):
    return _unit_vectors(
        model,
        lambda k, s: F.one_hot(torch.tensor(IMPORTANT[k.rsplit("softmask_", 1)[1]]), s[0]).float(),
    )


def _frozen_slices(net, block):
    """(parameter name, index) of every element that importance 1 must freeze, by hand."""
    from transformers.pytorch_utils import Conv1D

    d = block.head_dim
    h, j, i = IMPORTANT["heads"], IMPORTANT["intermediate"], IMPORTANT["output"]
    rows = slice(h * d, (h + 1) * d)
    group = block.num_heads // block.num_kv_heads
    kv_rows = slice((h // group) * d, (h // group + 1) * d)
    out = []
    if "qkv" in block.paths:  # GPT-2: Conv1D (in x out), fused q | k | v columns
        n = block.num_heads * d
        for part in range(3):
            cols = slice(part * n + h * d, part * n + (h + 1) * d)
            out += [(f"{block.paths['qkv']}.weight", (slice(None), cols))]
            out += [(f"{block.paths['qkv']}.bias", (cols,))]
    else:
        for role, sl in (("query", rows), ("key", kv_rows), ("value", kv_rows)):
            mod = net.get_submodule(block.paths[role])
            out.append((f"{block.paths[role]}.weight", (sl, slice(None))))
            if mod.bias is not None:
                out.append((f"{block.paths[role]}.bias", (sl,)))
    conv = isinstance(net.get_submodule(block.paths["attn_out"]), Conv1D)
    out.append(
        (f"{block.paths['attn_out']}.weight", (rows, slice(None)) if conv else (slice(None), rows))
    )
    for role in ("gate", "up"):
        if role in block.paths:
            out.append(
                (f"{block.paths[role]}.weight", (slice(None), j) if conv else (j, slice(None)))
            )
            if net.get_submodule(block.paths[role]).bias is not None:
                out.append((f"{block.paths[role]}.bias", (j,)))
    out.append((f"{block.paths['down']}.weight", (slice(None), i) if conv else (i, slice(None))))
    if net.get_submodule(block.paths["down"]).bias is not None:
        out.append((f"{block.paths['down']}.bias", (i,)))
    return out


@pytest.mark.parametrize(
    "arch, mask_mode",
    [
        ("bert", "grad"),
        ("gpt2", "grad"),
        ("llama", "grad"),
        ("bert", "update"),
        ("llama", "update"),
    ],
)
def test_important_units_stay_bit_exact_and_the_rest_moves(arch, mask_mode):
    if arch == "bert":
        net, batches = tiny_bert(dropout=0.0), text_batches()
    else:
        net, batches = (tiny_gpt2() if arch == "gpt2" else tiny_llama()), lm_batches()
    model = das_model(net, mask_mode=mask_mode)
    model.begin_task(0)
    seed_importance(model, _one_hot_importance(model))
    model.begin_task(1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    base = (
        torch.optim.SGD(net.parameters(), lr=0.5)
        if mask_mode == "grad"
        else torch.optim.AdamW(net.parameters(), lr=0.05)
    )
    opt = SoftMaskOptimizer(base, model)
    net.train()
    for _ in range(2):
        for b in batches:
            opt.zero_grad()
            net(**b).loss.backward()
            opt.step()
    after = dict(net.named_parameters())
    for block in model.method.blocks:
        frozen = _frozen_slices(net, block)
        keep_mask = {}
        for name, idx in frozen:
            assert torch.equal(after[name][idx], before[name][idx]), (name, idx)
            keep_mask.setdefault(name, torch.ones_like(before[name], dtype=torch.bool))[idx] = False
        for name, free in keep_mask.items():  # every free row and column moved somewhere
            moved = (after[name] != before[name]) & free
            for dim in range(moved.dim()):
                has_free = free.any(dim=dim) if moved.dim() > 1 else free
                hit = moved.any(dim=dim) if moved.dim() > 1 else moved
                assert bool(hit[has_free].all()), f"{name}: an unprotected unit did not move"
    embeddings = [n for n in before if "emb" in n or n.endswith("wte.weight")]
    assert embeddings and all(not torch.equal(after[n], before[n]) for n in embeddings)


def test_excluded_modules_are_not_masked():
    every = das_model(tiny_bert())
    every.begin_task(0)
    seed_importance(every, _one_hot_importance(every))
    masked = set(every.parameter_importance())
    assert any(".query." in n for n in masked)
    model = das_model(tiny_bert(), exclude_modules=["query"])
    model.begin_task(0)
    seed_importance(model, _one_hot_importance(model))
    kept = set(model.parameter_importance())
    assert kept == {n for n in masked if ".query." not in n}


# contrastive integration ---------------------------------------------------------------------


def test_info_nce_pairs_each_anchor_with_its_own_second_view():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    p = torch.tensor([[2.0, 0.1], [0.2, 1.0], [1.0, 0.8]], dtype=torch.float64)
    g = torch.tensor([[0.5, 0.5], [1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    tau = 0.05

    def cos(u, v):
        return float(u @ v / (u.norm() * v.norm()))

    expected = 0.0
    for i in range(3):
        logits = [cos(a[i], p[j]) / tau for j in range(3)] + [cos(a[i], g[i]) / tau]
        expected += -logits[i] + float(
            torch.logsumexp(torch.tensor(logits, dtype=torch.float64), 0)
        )
    expected /= 3
    assert float(info_nce(a, p, g, tau)) == pytest.approx(expected, rel=1e-5)
    swapped = info_nce(a, p[[1, 0, 2]], g, tau)  # wrong pairing gives a different loss
    assert float(swapped) != pytest.approx(expected, rel=1e-3)
    no_general = (
        sum(
            -cos(a[i], p[i]) / tau
            + float(
                torch.logsumexp(
                    torch.tensor([cos(a[i], p[j]) / tau for j in range(3)], dtype=torch.float64), 0
                )
            )
            for i in range(3)
        )
        / 3
    )
    assert float(info_nce(a, p, None, tau)) == pytest.approx(no_general, rel=1e-5)
    with pytest.raises(ValueError, match="general must match"):
        info_nce(a, p, g[:2], tau)


def test_integration_loss_uses_same_sequence_positive_and_importance_scaled_general():
    net = tiny_bert(dropout=0.0)
    model = das_model(net, DASConfig(contrastive_temperature=0.1, contrastive_weight=1.0))
    model.begin_task(0)
    seed_importance(model, _unit_vectors(model, lambda k, s: torch.linspace(0.2, 0.9, s[0])))
    batch = text_batches()[0]
    mask = batch["attention_mask"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask}
    with torch.no_grad():
        r = mean_pool(net.bert(**inputs).last_hidden_state, mask)
        general_net = copy.deepcopy(net)  # unit outputs x importance, written into the weights
        for b in discover_units(general_net):
            imp = {k: model.importance[b.key(k)] for k in ("heads", "intermediate", "output")}
            att = general_net.get_submodule(b.paths["attn_out"])
            att.weight.mul_(imp["heads"].repeat_interleave(b.head_dim)[None, :])
            down = general_net.get_submodule(b.paths["down"])
            down.weight.mul_(imp["intermediate"][None, :]).mul_(imp["output"][:, None])
            down.bias.mul_(imp["output"])
        g = mean_pool(general_net.bert(**inputs).last_hidden_state, mask)
    a = F.normalize(r, dim=-1)
    logits = torch.cat([a @ a.T, (a * F.normalize(g, dim=-1)).sum(-1, keepdim=True)], 1) / 0.1
    expected = F.cross_entropy(logits, torch.arange(len(r)))
    got = model.method.integration_loss(batch, model.importance)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    total = model.training_loss(batch)
    assert torch.allclose(total, net(**batch).loss + expected, rtol=1e-4, atol=1e-5)
    plain = das_model(net, DASConfig(contrastive_weight=0.0))
    assert torch.allclose(plain.training_loss(batch), net(**batch).loss)


def test_contrastive_positive_detached_takes_gradient_through_the_anchor_only():
    """Dropout-free model: both views equal the anchor, so the modes differ only in gradient.

    "grad": ∇ of info_nce(a, a, g); "detached": ∇ of info_nce(a, a.detach(), g), g fixed.
    """
    batch = text_batches()[0]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    grads = {}
    for mode in ("grad", "detached"):
        net = tiny_bert(dropout=0.0)
        model = das_model(net, DASConfig(contrastive_positive=mode))
        model.begin_task(0)
        seed_importance(model, _unit_vectors(model, lambda k, s: torch.linspace(0.2, 0.9, s[0])))
        model.method.integration_loss(batch, model.importance).backward()
        grads[mode] = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        ref = copy.deepcopy(net)
        ref.zero_grad(set_to_none=True)
        with torch.no_grad(), apply_virtual_masks(discover_units(ref), model.importance):
            g = mean_pool(ref.bert(**inputs).last_hidden_state, batch["attention_mask"])
        a = mean_pool(ref.bert(**inputs).last_hidden_state, batch["attention_mask"])
        info_nce(a, a if mode == "grad" else a.detach(), g, 0.05).backward()
        for n, p in ref.named_parameters():
            if p.grad is not None:
                assert torch.allclose(grads[mode][n], p.grad, rtol=1e-4, atol=1e-6), (mode, n)
    assert any(
        not torch.allclose(grads["grad"][n], grads["detached"][n], rtol=1e-3, atol=1e-6)
        for n in grads["grad"]
    )


# first-domain masking and the registry --------------------------------------------------------


def test_general_importance_masks_the_first_domain():
    model = das_model(tiny_bert(dropout=0.3))
    general = model.general_importance(text_batches())
    assert model.store.general is not None and model.num_tasks == 0
    model.begin_task(0)
    assert model.keep_masks.groups and model.head_keep() < 1.0
    got = model.parameter_importance()
    for b in model.method.blocks:  # the rows of Q that produce head h carry general[h]
        heads = general[b.key("heads")]
        q = got[b.paths["query"] + ".weight"]
        assert torch.equal(q, heads.repeat_interleave(b.head_dim)[:, None].expand_as(q))
        assert torch.equal(got[b.paths["down"] + ".bias"], general[b.key("output")])


def test_unknown_layout_is_a_config_error():
    from test_units import Toy

    with pytest.raises(ConfigError, match="das_units"):
        das_model(Toy())


def test_training_loss_needs_dict_batches():
    model = das_model(tiny_bert())
    with pytest.raises(ConfigError, match="dict batches"):
        model.training_loss((torch.zeros(2, 3, dtype=torch.long), torch.zeros(2)))


# persistence ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
@ENDS_UNTRAINED
def test_unit_importance_round_trips_through_save_and_load(tmp_path, dtype):
    model = das_model(tiny_gpt2(), importance_dtype=dtype)
    model.begin_task(0, name="d0")
    model.end_task(lm_batches())
    model.begin_task(1, name="d1")
    model.end_task(lm_batches(seed=9))
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / IMPORTANCE_NAME, framework="pt") as f:
        keys = set(f.keys())
    units = {
        f"transformer.h.{i}.softmask_{k}"
        for i in range(2)
        for k in ("heads", "intermediate", "output")
    }
    assert keys == units | {f"task.{t}.{u}" for t in range(2) for u in units}
    assert json.loads((tmp_path / "softmask_config.json").read_text())["method"] == "das"
    loaded = SoftMaskModel.from_pretrained(tiny_gpt2(seed=5), tmp_path)
    tol = 0 if dtype == "float32" else UINT8_A_TOL
    for k, v in model.importance.items():
        assert torch.allclose(loaded.importance[k], v, atol=tol, rtol=0)
    expected = model.parameter_importance()  # the original's masks, before any file
    loaded.begin_task(2)
    pi = loaded.parameter_importance()
    assert pi.keys() == expected.keys()
    assert all(torch.allclose(pi[k], expected[k], atol=tol, rtol=0) for k in pi)
    assert loaded.keep_masks.groups and loaded.head_keep() < 1.0
