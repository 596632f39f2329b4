"""SPG: parameter-level importance (Konishi et al., ICML 2023).

For task t and every head h <= t, over all of task t's training batches (train mode):

    g_h[p] = Σ_batches ∂L_h/∂p      L_t = CE(head_t(x), y)      L_h = Σ head_h(x)  (h < t)
    γ_h[p] = |tanh(standardize(g_h[p]))|                        γ^t[p] = max_h γ_h[p]

The backbone runs forward once per batch for all heads; the heads' gradients with respect to
the shared features are stacked and pushed through the backbone in one batched backward pass
(`is_grads_batched`), where the official code does a forward and backward pass per head and
copies every gradient to the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..batches import cross_entropy, logits_of, model_loss, split_batch, task_loss
from ..distributed import all_reduce_sum
from ..errors import EmptyDataError
from ..heads import MultiHeadClassifier
from .base import Importance, ImportanceMethod, check_finite
from .normalize import normalize_importance


@dataclass
class SPGConfig:
    """SPG's own options (none yet beyond the shared ones in `SoftMaskConfig`)."""


@dataclass
class SPGState:
    """One importance pass: per masked parameter, the summed gradients of every head."""

    task: int
    params: list[Tensor]
    sums: list[Tensor] | None = None
    batched_backward: bool = True  # cleared once an op without a batching rule is met


class SPG(ImportanceMethod):
    """Parameter-level importance: one [0, 1] value per element of every masked parameter."""

    name = "spg"

    def start(self, task_id: int) -> SPGState:
        named = dict(self.base_model.named_parameters())
        return SPGState(task_id, [named[n] for n in self.masked])

    def training_loss(
        self, batch: Any, accumulated: Mapping[str, Tensor], general: Mapping[str, Tensor] | None
    ) -> Tensor:
        """The task loss: the model's own loss for dict batches, cross-entropy for (x, y)."""
        return task_loss(self.base_model, batch)

    def _head_grads(self, state: SPGState, batch: Any) -> list[Tensor]:
        """Gradients of every head's loss, each stacked as (num_heads, *param.shape)."""
        base = self.base_model
        x, y, hf = split_batch(batch)
        if isinstance(base, MultiHeadClassifier) and state.task > 0:
            return self._multi_head_grads(state, base, x, y)
        if hf:
            loss = model_loss(base(**hf))
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
        params = state.params
        z = base.features(x)
        heads = list(base.heads)[: state.task + 1]
        losses = [heads[h](z).sum() for h in range(state.task)]
        losses.append(cross_entropy(heads[state.task](z), y))
        dz = torch.stack([torch.autograd.grad(L, z, retain_graph=True)[0] for L in losses])
        if state.batched_backward:
            try:
                grads = torch.autograd.grad(
                    z,
                    params,
                    grad_outputs=dz,
                    is_grads_batched=True,
                    allow_unused=True,
                    retain_graph=True,
                )
            except RuntimeError:
                state.batched_backward = False  # an op without a batching rule: loop over heads
        if not state.batched_backward:
            per_head = [
                torch.autograd.grad(z, params, grad_outputs=d, allow_unused=True, retain_graph=True)
                for d in dz
            ]
            return [
                torch.stack([torch.zeros_like(p) if g is None else g for g in gs])
                for gs, p in zip(zip(*per_head), params)
            ]
        n = len(losses)
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
            g.to(torch.promote_types(g.dtype, torch.float32)) for g in self._head_grads(state, batch)
        ]
        if state.sums is None:  # autograd may hand back expanded views: own the accumulators
            state.sums = [g.clone() for g in grads]
        else:
            torch._foreach_add_(state.sums, grads)
        return state

    def result(self, state: SPGState, general: Mapping[str, Tensor] | None = None) -> Importance:
        """γ^t[p] = max_h |tanh(standardize(g_h[p]))| for every masked parameter."""
        if state.sums is None:
            raise EmptyDataError(f"the importance pass of task {state.task} got no batches")
        state.sums = all_reduce_sum(state.sums)  # data-parallel ranks: sums over every shard
        check_finite(dict(zip(self.masked, state.sums)), f"SPG importance of task {state.task}")
        return {
            name: torch.stack([normalize_importance(g_h) for g_h in g]).amax(dim=0)
            for name, g in zip(self.masked, state.sums)
        }
