"""SPG: parameter-level importance (Konishi et al., ICML 2023), as DESIGN §3.

For task t and every head h <= t, over all of task t's training batches (train mode):

    g_h[p] = Σ_batches ∂L_h/∂p      L_t = CE(head_t(x), y)      L_h = Σ head_h(x)  (h < t)
    γ_h[p] = |tanh(standardize(g_h[p]))|                        γ^t[p] = max_h γ_h[p]

The backbone runs forward once per batch for all heads; the heads' gradients with respect to
the shared features are stacked and pushed through the backbone in one batched backward pass
(`is_grads_batched`), where the official code does a forward and backward pass per head and
copies every gradient to the CPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..batches import logits_of, model_loss, split_batch
from ..distributed import all_reduce_sum
from ..errors import EmptyDataError
from ..heads import MultiHeadClassifier
from .base import ImportanceMethod, check_finite
from .normalize import normalize_importance


class SPG(ImportanceMethod):
    """Parameter-level importance: one [0, 1] value per element of every masked parameter."""

    name = "spg"

    def begin_task(self, task_id: int) -> None:
        self._task = task_id
        self._sums: list[Tensor] | None = None
        self._batched_backward = True
        named = dict(self.model.base_model.named_parameters())
        self._params = [named[n] for n in self.model.masked_parameter_names]

    def _head_losses_grads(self, batch: Any, params: list[Tensor]) -> list[Tensor]:
        """Gradients of every head's loss, each stacked as (num_heads, *param.shape)."""
        base = self.model.base_model
        x, y, hf = split_batch(batch)
        if isinstance(base, MultiHeadClassifier) and self._task > 0:
            return self._multi_head_grads(base, x, y, params)
        if hf:
            loss = model_loss(base(**hf))
        else:
            out = base(x, task_id=self._task) if isinstance(base, MultiHeadClassifier) else base(x)
            loss = F.cross_entropy(logits_of(out), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [
            (torch.zeros_like(p) if g is None else g).unsqueeze(0) for g, p in zip(grads, params)
        ]

    def _multi_head_grads(
        self, base: MultiHeadClassifier, x: Tensor, y: Tensor, params: list[Tensor]
    ) -> list[Tensor]:
        z = base.features(x)
        heads = list(base.heads)[: self._task + 1]
        losses = [heads[h](z).sum() for h in range(self._task)]
        losses.append(F.cross_entropy(heads[self._task](z), y))
        dz = torch.stack([torch.autograd.grad(L, z, retain_graph=True)[0] for L in losses])
        if self._batched_backward:
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
                self._batched_backward = False  # an op without a batching rule: loop over heads
        if not self._batched_backward:
            per_head = [
                torch.autograd.grad(z, params, grad_outputs=d, allow_unused=True, retain_graph=True)
                for d in dz
            ]
            grads = [
                torch.stack([torch.zeros_like(p) if g is None else g for g in gs])
                for gs, p in zip(zip(*per_head), params)
            ]
            return grads
        n = len(losses)
        return [
            torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device) if g is None else g
            for g, p in zip(grads, params)
        ]

    def accumulate(self, batch: Any) -> None:
        """Add this batch's per-head gradients; sums are kept in at least float32.

        A float16 / bfloat16 model would otherwise sum in 8-11 mantissa bits, where a long
        task's sum stops growing (in bfloat16, 256 + 1 == 256) and distorts the importance.
        """
        grads = [
            g.to(torch.promote_types(g.dtype, torch.float32))
            for g in self._head_losses_grads(batch, self._params)
        ]
        if self._sums is None:  # autograd may hand back expanded views: own the accumulators
            self._sums = [g.clone() for g in grads]
        else:
            torch._foreach_add_(self._sums, grads)

    def finalize(self) -> dict[str, Tensor]:
        if self._sums is None:
            raise EmptyDataError(f"the importance pass of task {self._task} got no batches")
        names = self.model.masked_parameter_names
        self._sums = all_reduce_sum(self._sums)  # data-parallel ranks: sums over every shard
        check_finite(dict(zip(names, self._sums)), f"SPG importance of task {self._task}")
        out = {}
        for name, g in zip(names, self._sums):
            per_head = torch.stack([normalize_importance(g_h) for g_h in g])
            out[name] = per_head.amax(dim=0)
        self._sums = None
        return out
