"""DAS: unit-level importance for transformers (Ke et al., ICLR 2023, arXiv 2302.03241).

Units per block: attention heads, FFN intermediate neurons, FFN output neurons
(`softmask_peft.units`). Virtual masks m (ones, requires_grad) are multiplied into the forward
pass by hooks; for a pass over batches b with token counts n_b:

    raw[u]  = Σ_b |∂L_b/∂m_u| / Σ_b n_b          (mask gradients are per batch, never summed raw)
    I[u]    = |tanh((raw[u] - mean_layer) / std_layer)|   (per block and unit kind, unbiased std)

L is the proxy KL for the general-knowledge importance (`general_importance`, once, on the
base model before the first domain) and the domain's own loss for a domain's importance
(`end_task`). The general importance is stored on its own, and a domain's stored importance
is max(general, domain), so the accumulated importance is the max over the general importance
and every domain.

Store keys: `{block module name}.softmask_{heads|intermediate|output}`, one 1-D tensor each,
e.g. `bert.encoder.layer.0.softmask_heads` of shape (num_heads,).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batches import model_forward, model_loss, split_batch, task_loss
from ..contrastive import info_nce, mean_pool
from ..distributed import agreement, all_reduce_count, all_reduce_sum
from ..errors import ConfigError, EmptyDataError
from ..units import apply_virtual_masks, discover_units, ones_masks, parameter_importance
from .base import Importance, ImportanceMethod, Shape, check_finite
from .normalize import normalize_importance

CONTRASTIVE_POSITIVES = ("detached", "grad")
UNIT_DROPOUT_MODES = ("auto", "on", "off")


@dataclass
class DASConfig:
    """DAS's own options."""

    units: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "declare attention/FFN modules by hand (see softmask_peft.units)"},
    )
    contrastive_weight: float = field(
        default=0.1,
        metadata={
            "help": "weight of the contrastive integration loss (0.1: at 1.0 it stalled domain "
            "learning of a causal LM; see bench/das_causal_lm.py)"
        },
    )
    contrastive_temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature"})
    contrastive_positive: str = field(
        default="detached",
        metadata={
            "help": f"the positive view, one of {CONTRASTIVE_POSITIVES}: 'detached' = a second "
            "forward without gradient, batched with the 'general' forward (one extra no-grad "
            "pass per step); 'grad' = a second forward with gradient (the paper; one extra "
            "forward + backward)"
        },
    )
    unit_dropout: str = field(
        default="auto",
        metadata={
            "help": f"general importance, one of {UNIT_DROPOUT_MODES}: dropout on the unit "
            "outputs during the proxy-KL pass; 'auto' = only when the model's own dropout "
            "gives no signal (the first batch's proxy KL is exactly 0, e.g. Llama)"
        },
    )
    unit_dropout_rate: float = field(
        default=0.1, metadata={"help": "rate of that unit dropout (BERT's dropout is 0.1)"}
    )

    def __post_init__(self) -> None:
        if self.units is not None and not isinstance(self.units, dict):
            raise ConfigError(f"units must be a dict or None, got {type(self.units).__name__}")
        for name in ("contrastive_weight", "contrastive_temperature", "unit_dropout_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
        if not self.contrastive_weight >= 0:
            raise ConfigError(f"contrastive_weight must be >= 0, got {self.contrastive_weight!r}")
        if not self.contrastive_temperature > 0:
            raise ConfigError(
                f"contrastive_temperature must be > 0, got {self.contrastive_temperature!r}"
            )
        if self.contrastive_positive not in CONTRASTIVE_POSITIVES:
            raise ConfigError(
                f"contrastive_positive must be one of {CONTRASTIVE_POSITIVES}, "
                f"got {self.contrastive_positive!r}"
            )
        if self.unit_dropout not in UNIT_DROPOUT_MODES:
            raise ConfigError(
                f"unit_dropout must be one of {UNIT_DROPOUT_MODES}, got {self.unit_dropout!r}"
            )
        if not 0 < self.unit_dropout_rate < 1:
            raise ConfigError(
                f"unit_dropout_rate must be in (0, 1), got {self.unit_dropout_rate!r} "
                "(to disable the unit dropout set unit_dropout='off')"
            )


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


def combined_importance(
    importance: Mapping[str, Tensor] | None, general: Mapping[str, Tensor] | None
) -> Importance:
    """Elementwise max of `importance` and the general importance (either may be absent)."""
    merged = {k: v.to(torch.float32) for k, v in (importance or {}).items()}
    for k, g in (general or {}).items():
        merged[k] = torch.maximum(merged[k], g) if k in merged else g.clone()
    return merged


@dataclass
class DASState:
    """One pass: Σ_b |∂L_b/∂m| per unit tensor and the token count Σ_b n_b."""

    what: str
    sums: dict[str, Tensor]
    tokens: int = 0


class DAS(ImportanceMethod):
    """Unit-level importance: one [0, 1] value per head, intermediate and output neuron.

    Use through the model: `model.general_importance(first_domain_sample)` before
    `begin_task(0)`; per domain train on `model.training_loss(batch)` (domain loss +
    contrastive term) with a `SoftMaskOptimizer`, then `end_task(domain_batches)`.
    """

    name = "das"

    def __init__(self, base_model: nn.Module, masked: list[str], config: DASConfig) -> None:
        super().__init__(base_model, masked, config)
        self.blocks = discover_units(base_model, config.units)

    # ImportanceMethod interface ----------------------------------------------------------------

    def importance_shapes(self) -> dict[str, torch.Size]:
        return {
            b.key(kind): torch.Size([n]) for b in self.blocks for kind, n in b.unit_counts().items()
        }

    def storable_shapes(self) -> dict[str, torch.Size]:
        return self.importance_shapes()

    def required_importance(self) -> set[str]:
        return set(self.importance_shapes())

    def parameter_importance(
        self, accumulated: Mapping[str, Tensor], general: Mapping[str, Tensor] | None
    ) -> Importance:
        """Parameter-shaped importance of max(accumulated, general), rows/columns per unit.

        Only parameters the config selects (`target_modules` / `exclude_modules`) are masked.
        """
        merged = combined_importance(accumulated, general)
        if not merged:
            return {}
        selected = set(self.masked)
        return {k: v for k, v in parameter_importance(self.blocks, merged).items() if k in selected}

    def start(self, task_id: int) -> DASState:
        what = "DAS general importance" if task_id < 0 else f"DAS importance of task {task_id}"
        return DASState(what, {k: torch.zeros(s) for k, s in self.importance_shapes().items()})

    def add(self, state: DASState, batch: Any) -> DASState:
        """Add |∂L/∂m| of the domain loss on one batch."""
        return self._add(state, batch, self.domain_loss)

    def result(
        self, state: DASState, general: Mapping[str, Tensor] | None = None, shape: Shape | None = None
    ) -> Importance:
        """This domain's importance (shaped by `shape`), max-merged with the general importance."""
        own = self._normalized(state)
        return combined_importance(own if shape is None else shape(own), general)

    # the passes ------------------------------------------------------------------------------

    def general_importance(self, batches: Iterable[Any]) -> Importance:
        """General-knowledge importance by the proxy KL (train mode, dropout on).

        Run on the base model before the first domain, on a sample of the first domain.
        """
        return self.general_pass(batches)[0]

    def general_pass(self, batches: Iterable[Any]) -> tuple[Importance, float]:
        """(general importance, the unit-dropout rate used: 0 = the model's own dropout).

        The two passes differ only through dropout. A model without active dropout (Llama,
        Mistral, Qwen: dropout 0) gives identical passes, a proxy KL of exactly 0 and zero
        importance. `unit_dropout` then supplies the noise: dropout at `unit_dropout_rate` on
        the unit outputs (the virtual-mask sites), in this pass only. "auto" turns it on when
        the first batch's proxy KL is exactly 0 (that batch is then redone with it); "on" /
        "off" force it. If every unit's gradient is still 0 a RuntimeWarning says why.
        """
        cfg = self.config
        rate = {"on": cfg.unit_dropout_rate, "off": 0.0}.get(cfg.unit_dropout)
        was_training = self.base_model.training
        self.base_model.train()
        try:
            state = self.start(-1)
            # callers often sit under no_grad; ranks agree before the sum (distributed.agreement)
            with agreement("DAS general importance", self.importance_shapes), torch.enable_grad():
                for batch in batches:
                    loss, masks = self._masked_loss(batch, self.proxy_kl, rate or 0.0)
                    if rate is None:  # "auto", first batch: does the model's dropout give a signal?
                        rate = cfg.unit_dropout_rate if float(loss.detach()) == 0.0 else 0.0
                        if rate:
                            loss, masks = self._masked_loss(batch, self.proxy_kl, rate)
                    state = self._add_mask_gradients(state, loss, masks, batch)
            general = self._normalized(state)
            _warn_if_no_signal(state, cfg.unit_dropout, rate or 0.0)
            return general, rate or 0.0
        finally:
            self.base_model.train(was_training)

    @staticmethod
    def add_gradients(state: DASState, grads: Mapping[str, Tensor], tokens: int) -> DASState:
        """Accumulate one batch: sums[u] += |grad[u]|, token count += tokens.

        The sums move to the gradients' device on the first batch, so a pass on an accelerator
        does not copy to the host every batch; `raw_importance` returns them on the CPU.
        """
        for k, g in grads.items():
            if state.sums[k].device != g.device:
                state.sums[k] = state.sums[k].to(g.device)
            state.sums[k] += g.detach().abs().to(torch.float32)
        state.tokens += tokens
        return state

    def _add(self, state: DASState, batch: Any, loss_fn: Any) -> DASState:
        return self._add_mask_gradients(state, *self._masked_loss(batch, loss_fn), batch)

    def _masked_loss(
        self, batch: Any, loss_fn: Any, dropout: float = 0.0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """loss_fn(batch) with fresh virtual masks (and unit dropout at rate `dropout`) applied."""
        masks = ones_masks(self.blocks)
        with apply_virtual_masks(self.blocks, masks, dropout):
            loss = loss_fn(batch)
        return loss, masks

    def _add_mask_gradients(
        self, state: DASState, loss: Tensor, masks: dict[str, Tensor], batch: Any
    ) -> DASState:
        grads = torch.autograd.grad(loss, list(masks.values()), allow_unused=True)
        return self.add_gradients(
            state,
            {k: torch.zeros_like(m) if g is None else g for (k, m), g in zip(masks.items(), grads)},
            token_count(batch),
        )

    @staticmethod
    def raw_importance(state: DASState) -> Importance:
        """Σ_b |∂L_b/∂m| / Σ_b n_b of the pass so far (before normalisation)."""
        if state.tokens == 0:
            raise EmptyDataError(f"{state.what}: the pass got no batches (or no tokens)")
        return {k: v.cpu() / state.tokens for k, v in state.sums.items()}

    def _normalized(self, state: DASState) -> Importance:
        # data-parallel ranks: sums and token count over every shard
        state.sums, state.tokens = all_reduce_sum(state.sums), all_reduce_count(state.tokens)
        raw = self.raw_importance(state)
        check_finite(raw, state.what)
        return {k: normalize_importance(v) for k, v in raw.items()}

    # losses ------------------------------------------------------------------------------------

    def domain_loss(self, batch: Any) -> Tensor:
        """The domain's own loss: the model's loss for dict batches (MLM, causal LM, task), CE for (x, y)."""
        return task_loss(self.base_model, batch)

    def pooled(self, batch: Any) -> Tensor:
        """Mean over non-padding tokens of the last hidden state, (batch, hidden).

        transformers models run only their backbone (`model.base_model`, e.g. BertModel inside
        BertForMaskedLM), whose last_hidden_state is the model's last hidden state.
        """
        inputs = model_inputs(batch)
        base = self.base_model
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

    def integration_loss(
        self,
        batch: Any,
        importance: Mapping[str, Tensor] | None,
        anchor: Tensor | None = None,
    ) -> Tensor:
        """Contrastive integration term (InfoNCE, τ = contrastive_temperature).

        anchor = pooled x (dropout pass 1; pass `anchor` to reuse the training forward),
        positive = pooled x (pass 2), negatives = the other sequences' positives and x's
        "general" representation: a forward with unit outputs multiplied by `importance`
        (max(A, general)), without gradient (a fixed point to move away from; this also saves
        a third backward).
        """
        if anchor is None:
            anchor = self.pooled(batch)
        if self.config.contrastive_positive == "detached":
            positive, general = self._detached_views(batch, importance)
        else:
            positive, general = self.pooled(batch), None
            if importance:
                with torch.no_grad(), apply_virtual_masks(self.blocks, importance):
                    general = self.pooled(batch)
        return info_nce(anchor, positive, general, self.config.contrastive_temperature)

    @torch.no_grad()
    def _detached_views(
        self, batch: Any, importance: Mapping[str, Tensor] | None
    ) -> tuple[Tensor, Tensor | None]:
        """(positive, general) of a batch from one no-grad forward of the batch twice.

        Rows 0..B-1 run with unit masks 1 (the positive: the model's own dropout only), rows
        B..2B-1 with the importance (the general view); without importance only the positive.
        """
        if not importance:
            return self.pooled(batch), None
        inputs = model_inputs(batch)
        n = int(next(v for v in inputs.values() if isinstance(v, Tensor)).shape[0])
        twice = {
            k: torch.cat([v, v]) if isinstance(v, Tensor) and v.dim() and v.shape[0] == n else v
            for k, v in inputs.items()
        }
        masks = {
            k: torch.stack([torch.ones_like(v), v]).repeat_interleave(n, dim=0).unsqueeze(1)
            for k, v in importance.items()
        }
        with apply_virtual_masks(self.blocks, masks):
            both = self.pooled(twice)
        return both[:n], both[n:]

    def adds_loss_term(self) -> bool:
        return self.config.contrastive_weight != 0

    def training_loss(
        self, batch: Any, accumulated: Mapping[str, Tensor], general: Mapping[str, Tensor] | None
    ) -> Tensor:
        """Domain loss + contrastive_weight · integration loss, sharing the first forward pass."""
        _, _, hf = split_batch(batch)
        if not hf:
            raise ConfigError("DAS training_loss needs HF-style dict batches with 'labels'")
        out = model_forward(self.base_model, hf, output_hidden_states=True)
        loss = model_loss(out)
        weight = self.config.contrastive_weight
        if weight == 0:
            return loss
        anchor = mean_pool(out.hidden_states[-1], hf.get("attention_mask"))
        importance = combined_importance(accumulated, general)
        return loss + weight * self.integration_loss(batch, importance, anchor=anchor)


def _warn_if_no_signal(state: DASState, mode: str, rate: float) -> None:
    """RuntimeWarning when every unit's proxy-KL gradient was exactly 0 (importance all 0)."""
    if not state.tokens or any(bool(v.any()) for v in state.sums.values()):
        return
    if mode == "off":
        cause = (
            "both forward passes were identical (the model has no active dropout, like "
            "Llama-style models with dropout 0) and unit_dropout='off', so the proxy KL is 0"
        )
        fix = "set DASConfig(unit_dropout='auto') or 'on'"
    else:
        cause = (
            "the proxy KL's gradient is 0 for every unit even with dropout on the unit outputs "
            f"(rate {rate:g}): the pooled last hidden state does not depend on the units, or "
            "the batches have no tokens"
        )
        fix = "check the batches and DASConfig(units=...), or raise unit_dropout_rate"
    warnings.warn(
        f"DAS general importance is 0 for every unit: {cause}. The first domain will not be "
        f"protected by general knowledge. Fix: {fix}",
        RuntimeWarning,
        stacklevel=4,
    )
