"""Transformer units for DAS: discovery, virtual masks by hooks, unit -> parameter importance.

Units of one transformer block (Ke et al., ICLR 2023): attention heads, FFN intermediate neurons
and FFN output neurons. Blocks are found by module discovery, not by model paths: every
`nn.ModuleList` whose every element holds the modules of one known *layout* (relative names
inside a block) is a stack of blocks. Built-in layouts:

=========  ================================================  ==================================
layout     attention (query/key/value or fused qkv, output)   FFN (gate, up, down)
=========  ================================================  ==================================
bert       attention.self.{query,key,value},                  intermediate.dense, output.dense
           attention.output.dense  (BERT, RoBERTa, ELECTRA)
gpt2       attn.c_attn (fused, Conv1D), attn.c_proj           mlp.c_fc, mlp.c_proj
llama      self_attn.{q,k,v,o}_proj                           mlp.{gate,up,down}_proj
=========  ================================================  ==================================

Any other model is declared by hand with `SoftMaskConfig(das_units={...})`, a dict with the
same relative names (see `UnitLayout.from_dict`)::

    das_units = {
        "layers": "encoder.blocks",          # optional: the ModuleList's full name
        "query": "attn.q", "key": "attn.k", "value": "attn.v",   # or "qkv": "attn.qkv"
        "attn_out": "attn.proj",
        "gate": "ffn.gate",                  # optional (gated MLPs)
        "up": "ffn.fc1", "down": "ffn.fc2",
        "num_heads": 8, "num_kv_heads": 8,   # optional when the model has a config
    }

Projections may be `nn.Linear` (weight: out x in) or transformers' `Conv1D` (weight: in x out).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import TargetModulesError

UNIT_KINDS = ("heads", "intermediate", "output")
UNIT_PREFIX = "softmask_"


class UnitDiscoveryError(TargetModulesError):
    """No transformer block layout was recognised, or a declared one does not fit the model."""


@dataclass(frozen=True)
class UnitLayout:
    """Names of a block's projections, relative to the block. `qkv` replaces query/key/value."""

    attn_out: str
    up: str
    down: str
    query: str | None = None
    key: str | None = None
    value: str | None = None
    qkv: str | None = None
    gate: str | None = None

    def roles(self) -> dict[str, str]:
        """Role -> relative module name, for the roles this layout has."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}

    @classmethod
    def from_dict(
        cls, spec: Mapping[str, Any]
    ) -> tuple[UnitLayout, str | None, int | None, int | None]:
        """Validate a `das_units` dict; return (layout, layers, num_heads, num_kv_heads)."""
        if not isinstance(spec, Mapping):
            raise UnitDiscoveryError(f"das_units must be a dict, got {type(spec).__name__}")
        names = {f.name for f in fields(cls)}
        extra = {"layers", "num_heads", "num_kv_heads"}
        unknown = sorted(set(spec) - names - extra)
        if unknown:
            raise UnitDiscoveryError(
                f"unknown das_units keys: {', '.join(unknown)} "
                f"(known: {', '.join(sorted(names | extra))})"
            )
        missing = [k for k in ("attn_out", "up", "down") if not spec.get(k)]
        has_split = all(spec.get(k) for k in ("query", "key", "value"))
        if not has_split and not spec.get("qkv"):
            missing.append("query+key+value or qkv")
        if has_split and spec.get("qkv"):
            raise UnitDiscoveryError("das_units: give either query/key/value or qkv, not both")
        if missing:
            raise UnitDiscoveryError(f"das_units lacks {', '.join(missing)}")
        for k in names | {"layers"}:
            if spec.get(k) is not None and not isinstance(spec[k], str):
                raise UnitDiscoveryError(f"das_units[{k!r}] must be a module name (str)")
        for k in ("num_heads", "num_kv_heads"):
            v = spec.get(k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise UnitDiscoveryError(f"das_units[{k!r}] must be a positive int, got {v!r}")
        layout = cls(**{k: spec[k] for k in names if spec.get(k)})
        return layout, spec.get("layers"), spec.get("num_heads"), spec.get("num_kv_heads")


LAYOUTS: Mapping[str, UnitLayout] = {
    "bert": UnitLayout(
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        attn_out="attention.output.dense",
        up="intermediate.dense",
        down="output.dense",
    ),
    "gpt2": UnitLayout(qkv="attn.c_attn", attn_out="attn.c_proj", up="mlp.c_fc", down="mlp.c_proj"),
    "llama": UnitLayout(
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        attn_out="self_attn.o_proj",
        gate="mlp.gate_proj",
        up="mlp.up_proj",
        down="mlp.down_proj",
    ),
}


def _is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is transformers' Conv1D, without importing transformers (slow to import).

    An instance of the class implies its module is loaded; if it is not, no module is a Conv1D.
    """
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def _features(module: nn.Module, name: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    if hasattr(module, "base_layer"):  # a PEFT adapter layer (LoRA & co.) wraps the projection
        raise UnitDiscoveryError(
            f"{name} is a PEFT adapter layer ({kind}); DAS masks rows and columns of the "
            "projections themselves, which an adapter does not train. Use method='spg' on a "
            "PeftModel, or DAS on the model without adapters"
        )
    raise UnitDiscoveryError(f"{name} is a {kind}; DAS units need nn.Linear or transformers Conv1D")


@dataclass(frozen=True)
class BlockUnits:
    """One transformer block: its projections (full module names) and unit counts."""

    name: str
    modules: Mapping[str, nn.Module]
    paths: Mapping[str, str]
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def num_intermediate(self) -> int:
        return _features(self.modules["down"], self.paths["down"])[0]

    @property
    def num_output(self) -> int:
        return _features(self.modules["down"], self.paths["down"])[1]

    def key(self, kind: str) -> str:
        """Store key of one unit tensor, e.g. `bert.encoder.layer.0.softmask_heads`."""
        return f"{self.name}.{UNIT_PREFIX}{kind}"

    def unit_counts(self) -> dict[str, int]:
        return {
            "heads": self.num_heads,
            "intermediate": self.num_intermediate,
            "output": self.num_output,
        }


def _submodule(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def _config_heads(model: nn.Module) -> tuple[int | None, int | None]:
    """(num_attention_heads, num_key_value_heads) from the first transformers config found."""
    for module in model.modules():
        cfg = getattr(module, "config", None)
        heads = getattr(cfg, "num_attention_heads", None)
        if isinstance(heads, int):
            kv = getattr(cfg, "num_key_value_heads", None)
            return heads, kv if isinstance(kv, int) else heads
    return None, None


def _block(
    name: str, block: nn.Module, layout: UnitLayout, heads: int | None, kv_heads: int | None
) -> BlockUnits:
    """Resolve one block's modules and check that every dimension agrees with the head count."""
    paths = {role: f"{name}.{rel}" for role, rel in layout.roles().items()}
    modules = {role: block.get_submodule(rel) for role, rel in layout.roles().items()}
    if heads is None:
        raise UnitDiscoveryError(
            f"{name}: the number of attention heads is unknown (no model config with "
            "num_attention_heads); set das_units['num_heads']"
        )
    kv_heads = heads if kv_heads is None else kv_heads
    attn_in, _ = _features(modules["attn_out"], paths["attn_out"])
    if attn_in % heads:
        raise UnitDiscoveryError(
            f"{paths['attn_out']}: {attn_in} input features do not split into {heads} heads"
        )
    head_dim = attn_in // heads
    if "qkv" in modules:
        expected = {"qkv": (heads + 2 * kv_heads) * head_dim}
    else:
        expected = {
            "query": heads * head_dim,
            "key": kv_heads * head_dim,
            "value": kv_heads * head_dim,
        }
    if heads % kv_heads:
        raise UnitDiscoveryError(f"{name}: {heads} heads are not a multiple of {kv_heads} kv heads")
    inter, _ = _features(modules["down"], paths["down"])
    expected.update({r: inter for r in ("up", "gate") if r in modules})
    problems = [
        f"{paths[r]} has {_features(modules[r], paths[r])[1]} output features, expected {n}"
        for r, n in expected.items()
        if _features(modules[r], paths[r])[1] != n
    ]
    if problems:
        raise UnitDiscoveryError(f"{name}: " + "; ".join(problems))
    return BlockUnits(name, modules, paths, heads, kv_heads, head_dim)


def discover_units(
    model: nn.Module, das_units: Mapping[str, Any] | None = None
) -> list[BlockUnits]:
    """Every transformer block of `model` with its DAS units, in module order.

    Without `das_units`, each non-empty `nn.ModuleList` is tried against the built-in layouts;
    a list matches when all of its elements contain all of a layout's modules.
    """
    if das_units is not None:
        layout, layers, heads, kv_heads = UnitLayout.from_dict(das_units)
        layouts = {"das_units": layout}
        cfg_heads, cfg_kv = _config_heads(model)
        heads = heads or cfg_heads
        kv_heads = kv_heads or (cfg_kv if cfg_heads == heads else None)
    else:
        layouts, layers = dict(LAYOUTS), None
        heads, kv_heads = _config_heads(model)
    lists = [
        (name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)
    ]
    if layers is not None:
        lists = [(n, m) for n, m in lists if n == layers]
        if not lists:
            raise UnitDiscoveryError(
                f"das_units['layers']={layers!r} is not a non-empty nn.ModuleList of the model"
            )
    found: list[BlockUnits] = []
    for list_name, blocks in lists:
        for layout in layouts.values():
            rel = layout.roles().values()
            if all(_submodule(b, p) is not None for b in blocks for p in rel):
                found += [
                    _block(f"{list_name}.{i}", b, layout, heads, kv_heads)
                    for i, b in enumerate(blocks)
                ]
                break
    if not found:
        looked = "; ".join(f"{k}: {', '.join(v.roles().values())}" for k, v in layouts.items())
        seen = ", ".join(n for n, _ in lists[:8]) or "none"
        raise UnitDiscoveryError(
            "no transformer blocks found: no nn.ModuleList whose elements all contain the "
            f"modules of a known layout ({looked}). ModuleLists in the model: {seen}. "
            "Declare the modules with SoftMaskConfig(das_units={'query': ..., 'key': ..., "
            "'value': ... (or 'qkv'), 'attn_out': ..., 'up': ..., 'down': ..., "
            "'num_heads': ...}) (names relative to one block; see softmask_peft.units)"
        )
    return found


# virtual masks ---------------------------------------------------------------------------------


def ones_masks(blocks: Sequence[BlockUnits], requires_grad: bool = True) -> dict[str, Tensor]:
    """A tensor of ones per block and unit kind (the DAS virtual masks), keyed by store key."""
    out = {}
    for b in blocks:
        ref = b.modules["down"].weight
        for kind, n in b.unit_counts().items():
            out[b.key(kind)] = torch.ones(
                n, dtype=ref.dtype, device=ref.device, requires_grad=requires_grad
            )
    return out


def _scaled(x: Tensor, mask: Tensor, dropout: float) -> Tensor:
    y = x * mask.to(device=x.device, dtype=x.dtype)
    return F.dropout(y, dropout, training=True) if dropout else y


def _scale_input(mask: Tensor, repeat: int, dropout: float):
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        m = mask.repeat_interleave(repeat, dim=-1) if repeat > 1 else mask
        return (_scaled(args[0], m, dropout), *args[1:])

    return hook


def _scale_output(mask: Tensor, dropout: float):
    def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
        return _scaled(out, mask, dropout)

    return hook


@contextmanager
def apply_virtual_masks(
    blocks: Sequence[BlockUnits], masks: Mapping[str, Tensor], dropout: float = 0.0
) -> Iterator[None]:
    """Multiply unit masks into the forward pass while inside the `with` block (hooks only).

    heads: the per-head context entering the attention output projection, each head's
    `head_dim` features scaled by its mask; intermediate: the activations entering the down
    projection; output: the down projection's output, before dropout and the residual.

    `dropout` > 0 also applies inverted dropout (`F.dropout`, element-wise, a fresh draw per
    call) to those three masked tensors: DAS's source of stochasticity for the proxy KL on
    models without dropout of their own. 0 draws no random numbers.

    A mask is 1-D (one value per unit, shared by every sequence) or (batch, 1, units): one
    row per sequence, so one forward can run several mask settings side by side.
    """
    handles = []
    try:
        for b in blocks:
            handles.append(
                b.modules["attn_out"].register_forward_pre_hook(
                    _scale_input(masks[b.key("heads")], b.head_dim, dropout)
                )
            )
            handles.append(
                b.modules["down"].register_forward_pre_hook(
                    _scale_input(masks[b.key("intermediate")], 1, dropout)
                )
            )
            handles.append(
                b.modules["down"].register_forward_hook(
                    _scale_output(masks[b.key("output")], dropout)
                )
            )
        yield
    finally:
        for h in handles:
            h.remove()


# unit -> parameter ---------------------------------------------------------------------------


def _along(module: nn.Module, values: Tensor, axis: str) -> dict[str, Tensor]:
    """Spread per-feature values over a projection's weight (and bias for output features).

    axis="out": one value per output feature (nn.Linear rows, Conv1D columns) and bias entry;
    axis="in": one value per input feature (nn.Linear columns, Conv1D rows); bias not included.
    """
    w = module.weight
    transposed = _is_conv1d(module)
    per_row = (axis == "out") != transposed
    v = values.to(device=w.device, dtype=torch.float32)
    out = {"weight": (v[:, None] if per_row else v[None, :]).expand(w.shape).contiguous()}
    if axis == "out" and getattr(module, "bias", None) is not None:
        out["bias"] = v.clone()
    return out


def parameter_importance(
    blocks: Sequence[BlockUnits], importance: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Map unit importance onto parameters, keyed by full parameter name.

    head h: rows of Q, K, V that produce it (a K/V head shared by a group of query heads, as in
    grouped-query attention, takes the group's max) and the output projection's columns that
    read it; intermediate j: row j of up (and gate) and its bias; output i: row i of down and
    its bias. Everything else (embeddings, LayerNorms, the LM head) is absent, i.e. unmasked.
    """
    out: dict[str, Tensor] = {}

    def put(role: str, mapped: dict[str, Tensor]) -> None:
        for suffix, t in mapped.items():
            out[f"{b.paths[role]}.{suffix}"] = t

    for b in blocks:
        head = importance[b.key("heads")].to(torch.float32)
        q = head.repeat_interleave(b.head_dim)
        group = b.num_heads // b.num_kv_heads
        kv = head.view(b.num_kv_heads, group).amax(dim=1).repeat_interleave(b.head_dim)
        if "qkv" in b.modules:
            put("qkv", _along(b.modules["qkv"], torch.cat([q, kv, kv]), "out"))
        else:
            put("query", _along(b.modules["query"], q, "out"))
            put("key", _along(b.modules["key"], kv, "out"))
            put("value", _along(b.modules["value"], kv, "out"))
        put("attn_out", _along(b.modules["attn_out"], q, "in"))
        inter = importance[b.key("intermediate")]
        for role in ("gate", "up"):
            if role in b.modules:
                put(role, _along(b.modules[role], inter, "out"))
        put("down", _along(b.modules["down"], importance[b.key("output")], "out"))
    return out
