"""`LoRASubspaceCallback`: continual LoRA that forgets less, by soft-masking input subspaces.

Soft-masking LoRA's factors element by element (SPG on A and B) barely protects: every output
of ΔW = B·A mixes all of A's and B's values, and all tasks share them. This callback soft-masks
in the basis where tasks differ, the directions of each adapted layer's *inputs*:

    after task t, for every adapted linear layer (its input x, over the task's training tokens):
        C ← C + Σ x xᵀ / n                          input covariance, summed over tasks
        C = U diag(λ) Uᵀ,  a_k = tanh(λ_k / (s · mean λ))      importance of direction k, in [0, 1)
        K = I − U diag(a) Uᵀ                          the keep matrix (SPG's 1 − A, rotated)
        W ← W + (α/r)·B·A,  then a fresh adapter: A random, B = 0, A ← A·K     (fold)
    training task t+1, after every optimizer step:  A ← A_old + (A_new − A_old)·K

so the new adapter's ΔW·x = B·A·x stays small on the directions earlier tasks' inputs use (in
proportion to their energy), and the folded weights keep answering them. GPM (Saha et al. 2021)
and InfLoRA (Liang & Li 2024) project hard; this mask is soft, as SPG's keep is (s = `scale`:
smaller protects more directions more strongly).

Train with SGD. Under Adam the step on B is normalised (m/√v): a masked A (small A·x) does not
slow B down, and B·A·x on old inputs grows back (measured in `bench/continual_sft_lora.py`,
seed 0: forgetting 0.59 with AdamW, 0.15 with SGD). The callback warns under any other optimizer.

    model = get_peft_model(base, LoraConfig(r=8, target_modules=[...]))
    subspace = LoRASubspaceCallback(model)
    for task in tasks:
        SFTTrainer(model=model, args=SFTConfig(optim="sgd", ...), train_dataset=task,
                   callbacks=[subspace]).train()          # the end of train() folds the adapter
    save_file(subspace.state_dict(), "subspace.safetensors")   # the covariances, to continue

The adapter is folded into the base weights at the end of every `train()`: save the base model
(its weights carry every task) with the covariances, not the adapter alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..distributed import agreement, all_reduce_sum
from ..errors import ConfigError, EmptyDataError, ImportanceMismatchError, InputTypeError
from ..model import claim_model

_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")
_INITS = (True, "gaussian")  # adapter inits that start at ΔW = 0 (B = 0)


def _lora_layers(model: Any, adapter: str) -> dict[str, Any]:
    """The LoRA-adapted nn.Linear layers of `model` carrying `adapter`, by module name."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    layers = {n: m for n, m in layers.items() if adapter in m.lora_A}
    if not layers:
        raise ConfigError(f"no LoRA nn.Linear layer carries the adapter {adapter!r}")
    for n, m in layers.items():
        if m.use_dora.get(adapter, False) or m.lora_bias.get(adapter, False):
            raise ConfigError(f"{n}: DoRA and LoRA bias are not supported by the subspace mask")
    return layers


def _fresh_init(model: Any, adapter: str) -> Any:
    """The adapter's `init_lora_weights`, if a fresh adapter with it starts at ΔW = 0."""
    init = model.peft_config[adapter].init_lora_weights
    if init not in _INITS:
        raise ConfigError(
            f"init_lora_weights={init!r}: a fresh adapter must start at ΔW = 0 (one of {_INITS})"
        )
    return init


@torch.no_grad()
def fold_adapter(model: Any) -> None:
    """W ← W + (α/r)·B·A in every LoRA nn.Linear of the PeftModel's active adapter, then a fresh
    adapter in place (peft's own init: B = 0, so the model's function is unchanged)."""
    adapter = model.active_adapter
    init = _fresh_init(model, adapter)
    for m in _lora_layers(model, adapter).values():
        base = m.get_base_layer()
        base.weight += m.get_delta_weight(adapter).to(base.weight.dtype)
        m.reset_lora_parameters(adapter, init)


def subspace_keep(covariance: Tensor, scale: float) -> Tensor:
    """K = I − U diag(tanh(λ / (scale · mean λ))) Uᵀ for C = U diag(λ) Uᵀ (λ clamped at 0)."""
    lam, u = torch.linalg.eigh(covariance.double())
    lam = lam.clamp_min(0)
    mean = lam.mean()
    if mean <= 0:
        return torch.eye(len(lam), dtype=covariance.dtype)
    a = torch.tanh(lam / (scale * mean))
    keep = torch.eye(len(lam), dtype=torch.float64) - (u * a) @ u.T
    return keep.to(covariance.dtype)


class LoRASubspaceCallback(TrainerCallback):
    """Soft input-subspace masking of a PeftModel's LoRA A, one folded adapter per task (module doc).

    `model` is the PeftModel the trainer trains; `scale` > 0 sets how strongly a direction is
    protected for its share of the input energy (a_k = tanh(λ_k / (scale · mean λ))).
    """

    def __init__(self, model: Any, scale: float = 1.0) -> None:
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            raise InputTypeError(
                f"LoRASubspaceCallback needs a PeftModel, got {type(model).__name__}"
            )
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not 0 < scale < float("inf")
        ):
            raise ConfigError(f"scale must be a finite number > 0, got {scale!r}")
        self.adapter = model.active_adapter
        _fresh_init(model, self.adapter)  # every task's fold starts a fresh adapter
        self.layers = _lora_layers(model, self.adapter)
        claim_model(model, "LoRASubspaceCallback")  # last: a refused model stays unmarked
        self.model, self.scale = model, float(scale)
        self.covariance: dict[str, Tensor] = {}
        self.keep: dict[str, Tensor] = {}
        self._old: list[Tensor] = []

    def _a(self, name: str) -> Tensor:
        return self.layers[name].lora_A[self.adapter].weight

    # training -----------------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        trained = kw.get("model")
        if trained is not None and trained is not self.model:
            raise ConfigError(
                f"the trainer trains a {type(trained).__name__}, not the PeftModel this "
                "LoRASubspaceCallback masks: pass that PeftModel to the trainer"
            )
        opt = kw.get("optimizer")
        opt = getattr(opt, "optimizer", opt)
        if self.keep and opt is not None and not isinstance(opt, torch.optim.SGD):
            warnings.warn(
                f"LoRASubspaceCallback under {type(opt).__name__}: Adam-family steps normalise "
                "B's update, so the masked A protects little; train with optim='sgd'",
                stacklevel=2,
            )

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._old = [self._a(n).detach().clone() for n in self.keep]

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        with torch.no_grad():
            for (n, keep), old in zip(self.keep.items(), self._old):
                a = self._a(n)
                a.copy_(old + (a - old) @ keep.to(a.dtype))
        self._old = []

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        batches = kw.get("train_dataloader")
        if batches is None:
            raise EmptyDataError("no train dataloader to measure the task's input subspace on")
        self.end_task(batches)

    def end_task(self, batches: Iterable[Mapping[str, Any]]) -> None:
        """Add this task's input covariances, then fold the adapter and start a fresh masked one."""
        self.add_covariance(batches)
        self.fold()

    # the two steps ------------------------------------------------------------------------------

    @torch.no_grad()
    def add_covariance(self, batches: Iterable[Mapping[str, Any]]) -> None:
        """C ← C + Σ x xᵀ / n per layer over the batches' non-padding tokens; K from the new C.

        Under data parallelism every rank passes its own shard and Σ x xᵀ and n are summed over
        the ranks, so every rank gets the same C and K (different K would let the ranks' A drift
        apart while DDP keeps their gradients equal)."""
        sums = {n: torch.zeros(m.in_features, m.in_features) for n, m in self.layers.items()}
        count = {n: 0 for n in self.layers}
        keep_rows: list[Tensor | None] = [None]

        def hook(name: str) -> Any:
            def fwd(module: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
                if keep_rows[0] is not None and len(keep_rows[0]) == len(x):
                    x = x[keep_rows[0]]
                sums[name] += (x.T @ x).cpu()
                count[name] += len(x)

            return fwd

        handles = [m.register_forward_hook(hook(n)) for n, m in self.layers.items()]
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        # data-parallel ranks: each passes its shard, then they agree and sum (distributed.py)
        with agreement("LoRA subspace covariance", lambda: {n: s.shape for n, s in sums.items()}):
            try:
                for batch in batches:
                    if not isinstance(batch, Mapping) or "input_ids" not in batch:
                        raise InputTypeError(
                            "the subspace pass takes dict batches with 'input_ids' (as a "
                            f"Trainer's dataloader gives), got {type(batch).__name__}"
                        )
                    inputs = {k: batch[k].to(device) for k in _INPUT_KEYS if k in batch}
                    mask = inputs.get("attention_mask")
                    keep_rows[0] = None if mask is None else mask.reshape(-1).bool().cpu()
                    self.model(**inputs)
            finally:
                for h in handles:
                    h.remove()
                self.model.train(was_training)
        all_reduce_sum(sums)
        tokens = torch.tensor([count[n] for n in self.layers], dtype=torch.float64)
        count = dict(zip(self.layers, all_reduce_sum([tokens])[0].tolist()))
        if not any(count.values()):
            raise EmptyDataError("the subspace pass got no tokens")
        for n in self.layers:
            c = sums[n] / max(count[n], 1)
            self.covariance[n] = self.covariance[n] + c if n in self.covariance else c
            self.keep[n] = subspace_keep(self.covariance[n], self.scale).to(self._a(n).device)

    @torch.no_grad()
    def fold(self) -> None:
        """`fold_adapter`, then the fresh A starts in the free subspace: A ← A·K."""
        fold_adapter(self.model)
        for n, keep in self.keep.items():
            a = self._a(n)
            a.copy_(a @ keep.to(a.dtype))

    # persistence --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        """The accumulated input covariances, `{layer name}.covariance` (safetensors-ready)."""
        return {f"{n}.covariance": c.contiguous() for n, c in self.covariance.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore `state_dict()` output; checked whole before anything changes."""
        expected = {f"{n}.covariance": (n, m.in_features) for n, m in self.layers.items()}
        if set(state) != set(expected):
            missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ImportanceMismatchError(
                f"subspace state does not match the model's LoRA layers: missing {missing[:3]}, "
                f"unexpected {extra[:3]}"
            )
        loaded = {}
        for key, (n, d) in expected.items():
            c = state[key]
            if not isinstance(c, Tensor) or c.shape != (d, d) or not c.is_floating_point():
                raise ImportanceMismatchError(f"{key}: expected a float ({d}, {d}) tensor")
            if not bool(torch.isfinite(c).all()) or not torch.allclose(c, c.T, atol=1e-5):
                raise ImportanceMismatchError(f"{key}: not a finite symmetric covariance")
            loaded[n] = c.detach().float().cpu().clone()
        self.covariance = loaded
        self.keep = {
            n: subspace_keep(c, self.scale).to(self._a(n).device) for n, c in loaded.items()
        }


__all__ = ["LoRASubspaceCallback", "fold_adapter", "subspace_keep"]
