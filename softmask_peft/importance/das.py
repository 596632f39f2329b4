"""DAS: unit-level importance for transformers (Ke et al., ICLR 2023, arXiv 2302.03241), DESIGN §5.

Units per block: attention heads, FFN intermediate neurons, FFN output neurons
(`softmask_peft.units`). Virtual masks m (ones, requires_grad) are multiplied into the forward
pass by hooks; for a pass over batches b with token counts n_b:

    raw[u]  = Σ_b |∂L_b/∂m_u| / Σ_b n_b          (mask gradients are per batch, never summed raw)
    I[u]    = |tanh((raw[u] - mean_layer) / std_layer)|   (per block and unit kind, unbiased std)

L is the proxy KL for the general-knowledge importance (`general_importance`, once, on the
base model before the first domain) and the domain's own loss for a domain's importance
(`end_task`). A domain's stored importance is max(general, domain), so the accumulated
importance is the max over the general importance and every domain, as DESIGN §5 asks.

Store keys: `{block module name}.softmask_{heads|intermediate|output}`, one 1-D tensor each,
e.g. `bert.encoder.layer.0.softmask_heads` of shape (num_heads,).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..batches import logits_of, model_loss, split_batch
from ..contrastive import info_nce, mean_pool
from ..distributed import all_reduce_count, all_reduce_sum
from ..errors import ConfigError, EmptyDataError
from ..units import apply_virtual_masks, discover_units, ones_masks, parameter_importance
from .base import ImportanceMethod, check_finite
from .normalize import normalize_importance

if TYPE_CHECKING:
    from ..model import SoftMaskModel


def model_inputs(batch: Any) -> dict[str, Any]:
    """Forward kwargs of a batch without its labels: a dict's entries, or `input_ids` = x."""
    x, _, hf = split_batch(batch)
    if hf:
        return {k: v for k, v in hf.items() if k != "labels"}
    return {"input_ids": x}


def token_count(batch: Any) -> int:
    """Tokens in a batch: Σ attention_mask if given, else the number of input ids."""
    x, _, hf = split_batch(batch)
    if hf:
        if hf.get("attention_mask") is not None:
            return int(hf["attention_mask"].sum())
        ids = hf.get("input_ids")
        if ids is None:
            raise ConfigError("DAS needs 'input_ids' or 'attention_mask' in each batch")
        return int(ids.numel())
    return int(x.numel()) if not torch.is_floating_point(x) else int(x.shape[0])


class DAS(ImportanceMethod):
    """Unit-level importance: one [0, 1] value per head, intermediate and output neuron.

    Use: `model.method.general_importance(first_domain_sample)` before `begin_task(0)`; per
    domain train on `model.method.training_loss(batch)` (domain loss + contrastive term) with a
    `SoftMaskOptimizer`, then `end_task(domain_batches)`.
    """

    name = "das"

    def __init__(self, model: SoftMaskModel) -> None:
        super().__init__(model)
        self.blocks = discover_units(model.base_model, model.softmask_config.das_units)
        self.general: dict[str, Tensor] | None = None
        self._sums: dict[str, Tensor] | None = None
        self._tokens = 0
        self._task: int | None = None

    # ImportanceMethod interface ----------------------------------------------------------------

    def importance_shapes(self) -> dict[str, torch.Size]:
        return {
            b.key(kind): torch.Size([n]) for b in self.blocks for kind, n in b.unit_counts().items()
        }

    def parameter_importance(self, importance: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Parameter-shaped importance of max(accumulated, general), rows/columns per DESIGN §5.

        Only parameters the config selects (`target_modules` / `exclude_modules`) are masked.
        """
        merged = self.combined_importance(importance)
        if not merged:
            return {}
        selected = set(self.model.masked_parameter_names)
        return {k: v for k, v in parameter_importance(self.blocks, merged).items() if k in selected}

    def begin_task(self, task_id: int) -> None:
        self._task = task_id
        self._sums = {k: torch.zeros(s) for k, s in self.importance_shapes().items()}
        self._tokens = 0

    def accumulate(self, batch: Any) -> None:
        """Add |∂L/∂m| of the domain loss on one batch."""
        self._add(batch, self.domain_loss)

    def finalize(self) -> dict[str, Tensor]:
        """This domain's importance, max-merged with the general importance if computed."""
        return self.combined_importance(self._normalized(f"DAS importance of task {self._task}"))

    # the passes ------------------------------------------------------------------------------

    def general_importance(
        self, batches: Iterable[Any], desc: str = "general importance"
    ) -> dict[str, Tensor]:
        """General-knowledge importance by the proxy KL (train mode, dropout on); kept in `general`.

        Call it on the base model before `begin_task(0)`, on a sample of the first domain.
        """
        base = self.model.base_model
        was_training = base.training
        base.train()
        try:
            self.begin_task(-1)
            with torch.enable_grad():  # callers often sit under no_grad
                for batch in tqdm(batches, desc=desc, leave=False, disable=None):
                    self._add(batch, self.proxy_kl)
            self.general = self._normalized("DAS general importance")
        finally:
            base.train(was_training)
        return self.general

    def combined_importance(self, importance: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """Elementwise max of `importance` and the general importance (either may be absent)."""
        merged = {k: v.to(torch.float32) for k, v in (importance or {}).items()}
        for k, g in (self.general or {}).items():
            merged[k] = torch.maximum(merged[k], g) if k in merged else g.clone()
        return merged

    def add_gradients(self, grads: Mapping[str, Tensor], tokens: int) -> None:
        """Accumulate one batch: sums[u] += |grad[u]|, token count += tokens.

        The sums move to the gradients' device on the first batch, so a pass on an accelerator
        does not copy to the host every batch; `raw_importance` returns them on the CPU.
        """
        if self._sums is None:
            raise EmptyDataError("add_gradients() before begin_task()")
        for k, g in grads.items():
            if self._sums[k].device != g.device:
                self._sums[k] = self._sums[k].to(g.device)
            self._sums[k] += g.detach().abs().to(torch.float32)
        self._tokens += tokens

    def _add(self, batch: Any, loss_fn: Any) -> None:
        masks = ones_masks(self.blocks)
        with apply_virtual_masks(self.blocks, masks):
            loss = loss_fn(batch)
        grads = torch.autograd.grad(loss, list(masks.values()), allow_unused=True)
        self.add_gradients(
            {k: torch.zeros_like(m) if g is None else g for (k, m), g in zip(masks.items(), grads)},
            token_count(batch),
        )

    def raw_importance(self) -> dict[str, Tensor]:
        """Σ_b |∂L_b/∂m| / Σ_b n_b of the pass so far (before normalisation)."""
        if self._sums is None or self._tokens == 0:
            raise EmptyDataError("the DAS importance pass got no batches (or no tokens)")
        return {k: v.cpu() / self._tokens for k, v in self._sums.items()}

    def _normalized(self, what: str) -> dict[str, Tensor]:
        if self._sums is not None:  # data-parallel ranks: sums and count over every shard
            self._sums, self._tokens = all_reduce_sum(self._sums), all_reduce_count(self._tokens)
        raw = self.raw_importance()
        check_finite(raw, what)
        self._sums = None
        return {k: normalize_importance(v) for k, v in raw.items()}

    # losses ------------------------------------------------------------------------------------

    def domain_loss(self, batch: Any) -> Tensor:
        """The domain's own loss: the model's loss for dict batches (MLM, causal LM, task), CE for (x, y)."""
        x, y, hf = split_batch(batch)
        base = self.model.base_model
        if hf:
            return model_loss(base(**hf))
        return F.cross_entropy(logits_of(base(x)), y)

    def pooled(self, batch: Any) -> Tensor:
        """Mean over non-padding tokens of the last hidden state, (batch, hidden).

        transformers models run only their backbone (`model.base_model`, e.g. BertModel inside
        BertForMaskedLM), whose last_hidden_state is the model's last hidden state.
        """
        inputs = model_inputs(batch)
        base = self.model.base_model
        body = getattr(base, "base_model", None)
        if isinstance(body, nn.Module) and body is not base:
            hidden = body(**inputs).last_hidden_state  # skip the LM head: a vocab-wide matmul
        else:
            states = getattr(base(**inputs, output_hidden_states=True), "hidden_states", None)
            if not states:
                raise ConfigError(
                    "DAS needs a transformers model that returns hidden_states "
                    "(forward(..., output_hidden_states=True))"
                )
            hidden = states[-1]
        return mean_pool(hidden, inputs.get("attention_mask"))

    def proxy_kl(self, batch: Any) -> Tensor:
        """Σ_batch KL(softmax(r1) ‖ softmax(r2)) over the feature dimension.

        r1, r2 = pooled representations of the same batch from two forward passes; in train
        mode dropout makes them differ. In eval mode (the official code) the KL is exactly 0.
        """
        r1, r2 = self.pooled(batch), self.pooled(batch)
        return F.kl_div(
            F.log_softmax(r2, dim=-1), F.log_softmax(r1, dim=-1), log_target=True, reduction="sum"
        )

    def integration_loss(self, batch: Any, anchor: Tensor | None = None) -> Tensor:
        """Contrastive integration term (InfoNCE, τ = config.contrastive_temperature).

        anchor = pooled x (dropout pass 1; pass `anchor` to reuse the training forward),
        positive = pooled x (pass 2), negatives = the other sequences' positives and x's
        "general" representation: a forward with unit outputs multiplied by max(A, general),
        without gradient (a fixed point to move away from; this also saves a third backward).
        """
        if anchor is None:
            anchor = self.pooled(batch)
        positive = self.pooled(batch)
        importance = self.combined_importance(self.model.store.accumulated)
        general = None
        if importance:
            with torch.no_grad(), apply_virtual_masks(self.blocks, importance):
                general = self.pooled(batch)
        return info_nce(
            anchor, positive, general, self.model.softmask_config.contrastive_temperature
        )

    def training_loss(self, batch: Mapping[str, Any]) -> Tensor:
        """Domain loss + contrastive_weight · integration loss, sharing the first forward pass."""
        _, _, hf = split_batch(batch)
        if not hf:
            raise ConfigError("DAS training_loss needs HF-style dict batches with 'labels'")
        out = self.model.base_model(**hf, output_hidden_states=True)
        loss = model_loss(out)
        weight = self.model.softmask_config.contrastive_weight
        if weight == 0:
            return loss
        anchor = mean_pool(out.hidden_states[-1], hf.get("attention_mask"))
        return loss + weight * self.integration_loss(batch, anchor=anchor)
