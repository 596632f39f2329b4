"""Transformer unit discovery, virtual-mask hooks and the unit -> parameter map (softmask_peft.units)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import text_batches, tiny_bert, tiny_gpt2, tiny_llama, tiny_roberta
from torch import nn

from softmask_peft.errors import ConfigError
from softmask_peft.units import (
    UnitDiscoveryError,
    apply_virtual_masks,
    discover_units,
    ones_masks,
    parameter_importance,
)


class ToyBlock(nn.Module):
    """A hand-written pre-norm transformer block with non-standard names (for das_units)."""

    def __init__(self, dim: int = 8, heads: int = 2, ffn: int = 12) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, h, d // h).transpose(1, 2)

        att = torch.softmax(split(self.q(x)) @ split(self.k(x)).transpose(-1, -2), dim=-1)
        ctx = (att @ split(self.v(x))).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(ctx)
        return x + self.fc2(torch.relu(self.fc1(x)))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([ToyBlock(), ToyBlock()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x


TOY_UNITS = {
    "query": "q",
    "key": "k",
    "value": "v",
    "attn_out": "proj",
    "up": "fc1",
    "down": "fc2",
    "num_heads": 2,
}

# (model factory, expected block names, heads, kv heads, head_dim, intermediate, output)
CASES = {
    "bert": (tiny_bert, ["bert.encoder.layer.0", "bert.encoder.layer.1"], 2, 2, 8, 24, 16),
    "roberta": (
        tiny_roberta,
        ["roberta.encoder.layer.0", "roberta.encoder.layer.1"],
        2,
        2,
        8,
        24,
        16,
    ),
    "gpt2": (tiny_gpt2, ["transformer.h.0", "transformer.h.1"], 2, 2, 8, 64, 16),
    "llama": (tiny_llama, ["model.layers.0", "model.layers.1"], 4, 2, 4, 24, 16),
}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_discovery_finds_every_block_and_unit_count(arch):
    factory, names, heads, kv, head_dim, inter, out = CASES[arch]
    blocks = discover_units(factory())
    assert [b.name for b in blocks] == names
    for b in blocks:
        assert (b.num_heads, b.num_kv_heads, b.head_dim) == (heads, kv, head_dim)
        assert b.unit_counts() == {"heads": heads, "intermediate": inter, "output": out}
        assert b.key("heads") == f"{b.name}.softmask_heads"


def test_unrecognised_layout_names_what_is_missing_and_how_to_declare():
    with pytest.raises(UnitDiscoveryError) as e:
        discover_units(Toy())
    msg = str(e.value)
    assert "attention.self.query" in msg and "self_attn.q_proj" in msg and "attn.c_attn" in msg
    assert "blocks" in msg and "das_units" in msg
    assert isinstance(e.value, ConfigError)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_a_peft_adapter_layer_is_named_with_what_to_do_instead():
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query", "value"]))
    with pytest.raises(UnitDiscoveryError, match="PEFT adapter layer .*method='spg'"):
        discover_units(lora)


def test_manual_declaration():
    blocks = discover_units(Toy(), TOY_UNITS)
    assert [b.name for b in blocks] == ["blocks.0", "blocks.1"]
    assert blocks[0].unit_counts() == {"heads": 2, "intermediate": 12, "output": 8}
    assert blocks[0].paths["attn_out"] == "blocks.0.proj"
    assert discover_units(Toy(), {**TOY_UNITS, "layers": "blocks"})[1].name == "blocks.1"


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ({**TOY_UNITS, "ffn": "fc1"}, "unknown das_units keys: ffn"),
        ({k: v for k, v in TOY_UNITS.items() if k != "down"}, "lacks down"),
        ({k: v for k, v in TOY_UNITS.items() if k != "value"}, "query+key+value or qkv"),
        ({**TOY_UNITS, "qkv": "q"}, "not both"),
        ({**TOY_UNITS, "num_heads": 3}, "do not split into 3 heads"),
        ({**TOY_UNITS, "num_heads": 0}, "positive int"),
        ({**TOY_UNITS, "up": "nope"}, "no transformer blocks found"),
        ({**TOY_UNITS, "layers": "missing"}, "not a non-empty nn.ModuleList"),
        ({k: v for k, v in TOY_UNITS.items() if k != "num_heads"}, "set das_units['num_heads']"),
    ],
)
def test_bad_declarations_are_named(spec, fragment):
    with pytest.raises(UnitDiscoveryError, match=None) as e:
        discover_units(Toy(), spec)
    assert fragment in str(e.value)


def _forward(net, batch):
    out = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits


def _zero_head_columns(net, block, head):
    """Zero the output projection's weights that read `head` (Linear: columns, Conv1D: rows)."""
    from transformers.pytorch_utils import Conv1D

    mod = net.get_submodule(block.paths["attn_out"])
    sl = slice(head * block.head_dim, (head + 1) * block.head_dim)
    with torch.no_grad():
        if isinstance(mod, Conv1D):
            mod.weight[sl, :] = 0
        else:
            mod.weight[:, sl] = 0


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_head_mask_zero_equals_zeroing_its_output_projection_columns(arch):
    net = CASES[arch][0]()
    batch = text_batches(n=4, vocab=40)[0]
    blocks = discover_units(net)
    masks = ones_masks(blocks, requires_grad=False)
    masks[blocks[1].key("heads")][1] = 0.0
    with torch.no_grad(), apply_virtual_masks(blocks, masks):
        masked = _forward(net, batch)
    reference = copy.deepcopy(net)
    _zero_head_columns(reference, discover_units(reference)[1], 1)
    with torch.no_grad():
        expected = _forward(reference, batch)
        plain = _forward(net, batch)
    assert torch.equal(masked, expected)
    assert not torch.equal(masked, plain)
    with torch.no_grad():  # hooks are gone after the block
        assert torch.equal(_forward(net, batch), plain)


def test_ffn_masks_equal_zeroing_down_projection_columns_and_rows():
    net = tiny_bert()
    batch = text_batches(n=4, vocab=40)[0]
    blocks = discover_units(net)
    masks = ones_masks(blocks, requires_grad=False)
    masks[blocks[0].key("intermediate")][5] = 0.0
    masks[blocks[0].key("output")][3] = 0.0
    with torch.no_grad(), apply_virtual_masks(blocks, masks):
        masked = _forward(net, batch)
    ref = copy.deepcopy(net)
    down = ref.bert.encoder.layer[0].output.dense
    with torch.no_grad():
        down.weight[:, 5] = 0  # intermediate neuron 5 feeds column 5
        down.weight[3, :] = 0  # output neuron 3 is row 3 and bias 3
        down.bias[3] = 0
        expected = _forward(ref, batch)
    assert torch.allclose(masked, expected, atol=1e-6, rtol=0)


def test_manual_units_hooks_apply():
    net = Toy().eval()
    blocks = discover_units(net, TOY_UNITS)
    x = torch.randn(2, 3, 8)
    masks = ones_masks(blocks, requires_grad=False)
    masks[blocks[0].key("heads")][0] = 0.0
    with torch.no_grad(), apply_virtual_masks(blocks, masks):
        masked = net(x)
    ref = copy.deepcopy(net)
    with torch.no_grad():
        ref.blocks[0].proj.weight[:, :4] = 0
        assert torch.equal(masked, ref(x))


def _capture(block, seen):
    """Hooks recording the tensors at one block's three mask sites into `seen[site]`.

    Hooks run in registration order: registered before `apply_virtual_masks` they see the
    tensors before the mask hooks act (the down projection's output computed from the already
    hooked input), registered inside it they see the hooked ones.
    """

    def pre(site):
        return lambda module, args: seen.setdefault(site, []).append(args[0].detach().clone())

    att, down = block.modules["attn_out"], block.modules["down"]
    return [
        att.register_forward_pre_hook(pre("heads")),
        down.register_forward_pre_hook(pre("intermediate")),
        down.register_forward_hook(
            lambda module, args, out: seen.setdefault("output", []).append(out.detach().clone())
        ),
    ]


def test_unit_dropout_drops_elements_at_the_three_sites_and_rescales_the_rest():
    net = tiny_llama().train()
    blocks = discover_units(net)
    b = blocks[0]
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 40, (8, 12), generator=g)}
    masks = ones_masks(blocks, requires_grad=False)
    masks[b.key("heads")][0] = 0.5  # the masks still multiply in
    p = 0.25
    seen: dict[str, list[torch.Tensor]] = {}
    handles = _capture(b, seen)
    try:
        with torch.no_grad(), apply_virtual_masks(blocks, masks, dropout=p):
            handles += _capture(b, seen)
            net(**batch)
    finally:
        for h in handles:
            h.remove()
    head_scale = torch.ones(b.num_heads * b.head_dim)
    head_scale[: b.head_dim] = 0.5
    for site, (before, after) in seen.items():
        if site == "heads":
            before = before * head_scale
        dropped = after == 0
        assert torch.allclose(after[~dropped], before[~dropped] / (1 - p), rtol=1e-6), site
        assert 0.15 < float(dropped.float().mean()) < 0.35, site
    with torch.no_grad(), apply_virtual_masks(blocks, ones_masks(blocks, False), dropout=0.0):
        twice = [net(**batch).logits for _ in range(2)]
    assert torch.equal(twice[0], twice[1])  # rate 0 draws nothing: Llama stays deterministic


def test_per_sequence_masks_equal_separate_forwards():
    net = tiny_gpt2().eval()
    blocks = discover_units(net)
    batch = text_batches(n=4, vocab=40)[0]
    imp = _unit_importance(blocks)
    n = batch["input_ids"].shape[0]
    per_seq = {
        k: torch.stack([torch.ones_like(v), v]).repeat_interleave(n, dim=0).unsqueeze(1)
        for k, v in imp.items()
    }
    twice = {k: torch.cat([batch[k], batch[k]]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        with apply_virtual_masks(blocks, per_seq):
            both = net(**twice).logits
        plain = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with apply_virtual_masks(blocks, imp):
            masked = net(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
    assert torch.allclose(both[:n], plain, atol=1e-5)
    assert torch.allclose(both[n:], masked, atol=1e-5)
    assert not torch.allclose(plain, masked, atol=1e-3)


def _unit_importance(blocks, head=1, inter=5, out=3):
    imp = {}
    for b in blocks:
        for kind, n in b.unit_counts().items():
            imp[b.key(kind)] = torch.zeros(n)
        imp[b.key("heads")][head] = 1.0
        imp[b.key("intermediate")][inter] = 0.5
        imp[b.key("output")][out] = 0.25
    return imp


def test_parameter_map_bert_rows_and_columns():
    net = tiny_bert()
    blocks = discover_units(net)
    pi = parameter_importance(blocks, _unit_importance(blocks))
    p = "bert.encoder.layer.0."
    expected_rows = torch.zeros(16)
    expected_rows[8:16] = 1.0  # head 1 of 2, head_dim 8
    for qkv in ("query", "key", "value"):
        assert torch.equal(
            pi[f"{p}attention.self.{qkv}.weight"], expected_rows[:, None].expand(16, 16)
        )
        assert torch.equal(pi[f"{p}attention.self.{qkv}.bias"], expected_rows)
    assert torch.equal(
        pi[f"{p}attention.output.dense.weight"], expected_rows[None, :].expand(16, 16)
    )
    assert f"{p}attention.output.dense.bias" not in pi
    up = torch.zeros(24, 16)
    up[5] = 0.5
    assert torch.equal(pi[f"{p}intermediate.dense.weight"], up)
    assert pi[f"{p}intermediate.dense.bias"][5] == 0.5
    down = torch.zeros(16, 24)
    down[3] = 0.25
    assert torch.equal(pi[f"{p}output.dense.weight"], down)
    assert pi[f"{p}output.dense.bias"].tolist() == [0.25 if i == 3 else 0.0 for i in range(16)]
    names = set(pi)
    assert not any("embeddings" in n or "LayerNorm" in n or "classifier" in n for n in names)
    assert len(names) == 2 * 11


def test_parameter_map_gpt2_fused_and_transposed():
    net = tiny_gpt2()
    blocks = discover_units(net)
    pi = parameter_importance(blocks, _unit_importance(blocks))
    p = "transformer.h.0."
    head = torch.zeros(16)
    head[8:16] = 1.0
    qkv = torch.cat([head, head, head])  # q | k | v blocks of the fused c_attn output
    assert torch.equal(
        pi[f"{p}attn.c_attn.weight"], qkv[None, :].expand(16, 48)
    )  # Conv1D: in x out
    assert torch.equal(pi[f"{p}attn.c_attn.bias"], qkv)
    assert torch.equal(pi[f"{p}attn.c_proj.weight"], head[:, None].expand(16, 16))  # rows = inputs
    fc = torch.zeros(16, 64)
    fc[:, 5] = 0.5
    assert torch.equal(pi[f"{p}mlp.c_fc.weight"], fc)
    proj = torch.zeros(64, 16)
    proj[:, 3] = 0.25
    assert torch.equal(pi[f"{p}mlp.c_proj.weight"], proj)
    assert pi[f"{p}mlp.c_proj.bias"][3] == 0.25 and pi[f"{p}mlp.c_proj.bias"].sum() == 0.25


def test_parameter_map_llama_grouped_query_attention():
    net = tiny_llama(heads=4, kv_heads=2)
    blocks = discover_units(net)
    imp = _unit_importance(blocks, head=1)
    imp[blocks[0].key("heads")][3] = 0.75
    pi = parameter_importance(blocks, imp)
    p = "model.layers.0."
    q = torch.tensor([0.0, 1.0, 0.0, 0.75]).repeat_interleave(4)
    kv = torch.tensor([1.0, 0.75]).repeat_interleave(4)  # kv head g serves query heads 2g, 2g+1
    assert torch.equal(pi[f"{p}self_attn.q_proj.weight"], q[:, None].expand(16, 16))
    assert torch.equal(pi[f"{p}self_attn.k_proj.weight"], kv[:, None].expand(8, 16))
    assert torch.equal(pi[f"{p}self_attn.v_proj.weight"], kv[:, None].expand(8, 16))
    assert torch.equal(pi[f"{p}self_attn.o_proj.weight"], q[None, :].expand(16, 16))
    for name in ("gate_proj", "up_proj"):
        expected = torch.zeros(24, 16)
        expected[5] = 0.5
        assert torch.equal(pi[f"{p}mlp.{name}.weight"], expected)
    assert pi[f"{p}mlp.down_proj.weight"][3].eq(0.25).all()
