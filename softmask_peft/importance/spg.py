"""SPG: parameter-level importance (Konishi et al., ICML 2023).

For task t and every head h <= t, over all of task t's training batches (train mode):

    g_h[p] = Σ_batches ∂L_h/∂p      L_t = CE(head_t(x), y)      L_h = Σ head_h(x)  (h < t)
    γ_h[p] = |tanh(standardize(g_h[p]))|                        γ^t[p] = max_h γ_h[p]

The backbone runs forward once per batch for all heads; the heads' gradients with respect to
the shared features are stacked and pushed through the backbone in one batched backward pass
(`is_grads_batched`), where the official code does a forward and backward pass per head and
copies every gradient to the CPU.

Last layer, factored: when the features end in z = φ(u), u = a Wᵀ + b (an `nn.Linear` followed
only by element-wise modules, checked on every batch through forward hooks), head h's
gradient at u is δ_h = dz_h ⊙ s with s = ∂z/∂u per element. An earlier head's loss Σ logits
has the same dz_h = d_h in every row (checked exactly), so its weight gradient
Σ_i (d_h ⊙ s_i) a_iᵀ = d_h ⊙ (Σ_i s_i a_iᵀ) shares one product sᵀa across those heads, and
its bias gradient is d_h ⊙ Σ_i s_i; the batched backward then starts at u and skips W and b.
Same values up to float rounding (the sums are taken in another order).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..batches import (
    as_model_dtype,
    cross_entropy,
    logits_of,
    model_forward,
    model_loss,
    split_batch,
    task_loss,
)
from ..distributed import all_reduce_sum
from ..errors import ConfigError, EmptyDataError
from ..heads import MultiHeadClassifier
from .base import Importance, ImportanceMethod, Shape, check_finite
from .normalize import normalize_importance


@dataclass
class SPGConfig:
    """SPG's own options.

    `cross_heads` (the paper: True): task t's importance also measures every earlier head's
    Σ logits on task t's inputs (max over heads). False measures only the task's own loss,
    L_t; earlier heads are then protected by their own tasks' importance alone.
    """

    cross_heads: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.cross_heads, bool):
            raise ConfigError(f"SPGConfig.cross_heads must be a bool, got {self.cross_heads!r}")


@dataclass
class SPGState:
    """One importance pass: per masked parameter, the summed gradients of every head."""

    task: int
    params: list[Tensor]
    sums: list[Tensor] | None = None
    batched_backward: bool = True  # cleared once an op without a batching rule is met
    factored_last_layer: bool = True  # the shared sᵀa product where it applies (same values)


class SPG(ImportanceMethod):
    """Parameter-level importance: one [0, 1] value per element of every masked parameter."""

    name = "spg"

    def start(self, task_id: int) -> SPGState:
        named = dict(self.base_model.named_parameters())
        return SPGState(task_id, [named[n] for n in self.masked])

    def parameter_importance(
        self, accumulated: Mapping[str, Tensor], general: Mapping[str, Tensor] | None
    ) -> Importance:
        """A of the parameters masked now (ā averages exactly those; a parameter no longer
        masked, e.g. a frozen adapter, keeps its stored importance but is not masked)."""
        return {k: accumulated[k] for k in self.masked if k in accumulated}

    def training_loss(
        self, batch: Any, accumulated: Mapping[str, Tensor], general: Mapping[str, Tensor] | None
    ) -> Tensor:
        """The task loss: the model's own loss for dict batches, cross-entropy for (x, y)."""
        return task_loss(self.base_model, batch)

    def _head_grads(self, state: SPGState, batch: Any) -> list[Tensor]:
        """Gradients of every head's loss, each stacked as (num_heads, *param.shape)."""
        base = self.base_model
        x, y, hf = split_batch(batch)
        x = as_model_dtype(base, x)
        if isinstance(base, MultiHeadClassifier) and state.task > 0 and self.config.cross_heads:
            return self._multi_head_grads(state, base, x, y)
        if hf:
            loss = model_loss(model_forward(base, hf))
        else:
            out = base(x, task_id=state.task) if isinstance(base, MultiHeadClassifier) else base(x)
            loss = cross_entropy(logits_of(out), y)
        grads = torch.autograd.grad(loss, state.params, allow_unused=True)
        return [
            (torch.zeros_like(p) if g is None else g).unsqueeze(0)
            for g, p in zip(grads, state.params)
        ]

    def _multi_head_grads(
        self, state: SPGState, base: MultiHeadClassifier, x: Tensor, y: Tensor
    ) -> list[Tensor]:
        with _LinearTail(base.backbone) as tail:
            z = base.features(x)
        heads = list(base.heads)[: state.task + 1]
        losses = [heads[h](z).sum() for h in range(state.task)]
        losses.append(cross_entropy(heads[state.task](z), y))
        dz = torch.stack([torch.autograd.grad(L, z, retain_graph=True)[0] for L in losses])
        last = tail.last_linear(z) if state.factored_last_layer else None
        own: dict[int, str] = {}
        if last is not None:
            linear = last[0]
            own = {
                id(p): k
                for k, p in (("weight", linear.weight), ("bias", linear.bias))
                if p is not None and any(p is q for q in state.params)
            }
        if not own:
            return self._backward(state, z, dz, state.params)
        _, a, u = last
        (s,) = torch.autograd.grad(z, u, grad_outputs=torch.ones_like(z), retain_graph=True)
        delta = dz * s  # (heads, batch, out): gradient of every head's loss at u
        rest = [p for p in state.params if id(p) not in own]
        rest_grads = iter(self._backward(state, u, delta, rest) if rest else [])
        factored = _factored_linear_grads(dz, s, delta, a.detach())
        return [factored[own[id(p)]] if id(p) in own else next(rest_grads) for p in state.params]

    def _backward(
        self, state: SPGState, out: Tensor, grad_out: Tensor, params: list[Tensor]
    ) -> list[Tensor]:
        """Σ over the batch of grad_out[h] · ∂out/∂p for every head h, stacked per parameter."""
        if state.batched_backward:
            try:
                grads = torch.autograd.grad(
                    out,
                    params,
                    grad_outputs=grad_out,
                    is_grads_batched=True,
                    allow_unused=True,
                    retain_graph=True,
                )
            except RuntimeError:
                state.batched_backward = False  # an op without a batching rule: loop over heads
        if not state.batched_backward:
            per_head = [
                torch.autograd.grad(
                    out, params, grad_outputs=d, allow_unused=True, retain_graph=True
                )
                for d in grad_out
            ]
            return [
                torch.stack([torch.zeros_like(p) if g is None else g for g in gs])
                for gs, p in zip(zip(*per_head), params)
            ]
        n = grad_out.shape[0]
        return [
            torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device) if g is None else g
            for g, p in zip(grads, params)
        ]

    def add(self, state: SPGState, batch: Any) -> SPGState:
        """Add this batch's per-head gradients; sums are kept in at least float32.

        A float16 / bfloat16 model would otherwise sum in 8-11 mantissa bits, where a long
        task's sum stops growing (in bfloat16, 256 + 1 == 256) and distorts the importance.
        """
        grads = [
            g.to(torch.promote_types(g.dtype, torch.float32))
            for g in self._head_grads(state, batch)
        ]
        if state.sums is None:  # autograd may hand back expanded views: own the accumulators
            state.sums = [g.clone() for g in grads]
        else:
            torch._foreach_add_(state.sums, grads)
        return state

    def result(
        self, state: SPGState, general: Mapping[str, Tensor] | None = None, shape: Shape | None = None
    ) -> Importance:
        """γ^t[p] = max_h |tanh(standardize(g_h[p]))| for every masked parameter, then `shape`."""
        if state.sums is None:
            raise EmptyDataError(f"the importance pass of task {state.task} got no batches")
        state.sums = all_reduce_sum(state.sums)  # data-parallel ranks: sums over every shard
        check_finite(dict(zip(self.masked, state.sums)), f"SPG importance of task {state.task}")
        out = {
            name: torch.stack([normalize_importance(g_h) for g_h in g]).amax(dim=0)
            for name, g in zip(self.masked, state.sums)
        }
        return out if shape is None else shape(out)


# modules whose output depends on their input element by element (a diagonal Jacobian)
_ELEMENTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Dropout,
    nn.Identity,
)


class _LinearTail:
    """Records the leaf modules a forward pass calls, to find features z = φ(Linear(a)).

    `last_linear(z)` gives (linear, a, u) when the last `nn.Linear` call took a 2-D input,
    every later call is an element-wise module (not in place) fed by the previous output, the
    last of which is z, and z's graph uses the layer's parameters nowhere else; otherwise
    None (the factored path does not apply).
    """

    def __init__(self, backbone: nn.Module) -> None:
        self.leaves = [m for m in backbone.modules() if next(m.children(), None) is None]
        self.calls: list[tuple[nn.Module, tuple, Any]] = []
        self.handles: list[Any] = []

    def __enter__(self) -> _LinearTail:
        self.handles = [m.register_forward_hook(self._record) for m in self.leaves]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def _record(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.calls.append((module, args, output))

    def last_linear(self, z: Tensor) -> tuple[nn.Linear, Tensor, Tensor] | None:
        # exact types: a subclass (a quantized or adapter Linear, say) may compute otherwise
        linear_at = [i for i, (m, _, _) in enumerate(self.calls) if type(m) is nn.Linear]
        if not linear_at:
            return None
        linear, args, u = self.calls[linear_at[-1]]
        previous = u
        for module, inputs, output in self.calls[linear_at[-1] + 1 :]:
            if (
                type(module) not in _ELEMENTWISE
                or getattr(module, "inplace", False)
                or len(inputs) != 1
                or inputs[0] is not previous
            ):
                return None
            previous = output
        ok = previous is z and len(args) == 1 and args[0].dim() == 2 and u.requires_grad
        return (linear, args[0], u) if ok and _used_once(z, linear) else None


def _used_once(z: Tensor, linear: nn.Linear) -> bool:
    """Whether z's autograd graph reads the layer's weight and bias once each, so the single
    recorded call holds their whole gradient (not so for a layer called twice or a weight
    also used functionally elsewhere in the backbone)."""
    params = [p for p in (linear.weight, linear.bias) if p is not None and p.requires_grad]
    uses = {id(p): 0 for p in params}
    seen, stack = set(), [z.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for nxt, _ in fn.next_functions:
            var = getattr(nxt, "variable", None)
            if var is not None and id(var) in uses:
                uses[id(var)] += 1
            stack.append(nxt)
    return all(n == 1 for n in uses.values())


def _factored_linear_grads(dz: Tensor, s: Tensor, delta: Tensor, a: Tensor) -> dict[str, Tensor]:
    """Per-head gradients of the last linear layer's weight and bias, (heads, *shape).

    Heads whose dz has one row repeated over the batch share sᵀa (see the module docstring);
    the others (the current task's cross-entropy) take δ_hᵀ a. Written in place, head by head.
    """
    heads, _, width = dz.shape
    weight = dz.new_empty((heads, width, a.shape[1]))
    bias = dz.new_empty((heads, width))
    constant = [bool((d == d[0]).all()) for d in dz]
    shared = s.transpose(0, 1) @ a if any(constant) else None
    s_sum = s.sum(0)
    for h, d in enumerate(dz):
        if constant[h]:
            torch.mul(d[0].unsqueeze(1), shared, out=weight[h])
            torch.mul(d[0], s_sum, out=bias[h])
        else:
            torch.matmul(delta[h].transpose(0, 1), a, out=weight[h])
            torch.sum(delta[h], 0, out=bias[h])
    return {"weight": weight, "bias": bias}
