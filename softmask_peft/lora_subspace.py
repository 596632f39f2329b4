"""LoRA's soft-mask: the input subspaces earlier tasks used, one folded adapter per task.

Soft-masking LoRA's factors element by element (SPG on A and B) barely protects: every output
of ΔW = B·A mixes all of A's and B's values, and all tasks share them. For a LoRA `PeftModel`
(`SoftMaskConfig(lora_mask="subspace")`, the default) the `SoftMaskModel` soft-masks in the
basis where tasks differ, the directions of each adapted layer's *inputs*:

    after task t, for every adapted linear layer (its input x, over the task's tokens):
        C ← C + Σ x xᵀ / n                          input covariance, summed over tasks
        C = U diag(λ) Uᵀ,  a_k = tanh(λ_k / (s · Σλ))       importance of direction k, in [0, 1)
        K = I − U diag(a) Uᵀ                          the keep matrix (SPG's 1 − A, rotated)
        W ← W + (α/r)·B·A,  then a fresh adapter: A random, B = 0, A ← A·K     (fold)
    training task t+1, after every optimizer step:  A ← A_old + (A_new − A_old)·K

so the new adapter's ΔW·x = B·A·x stays small on the directions earlier tasks' inputs use (in
proportion to their energy), and the folded weights keep answering them. GPM (Saha et al. 2021)
and InfLoRA (Liang & Li 2024) project hard; this mask is soft, as SPG's keep is.
s = `lora_subspace_scale` is an energy share: a direction carrying the share s of the layer's
input energy is protected by tanh(1) = 0.76 whatever the layer's width (smaller protects more).

Train with SGD. Under Adam the step on B is normalised (m/√v): a masked A (small A·x) does not
slow B down, and B·A·x on old inputs grows back (`bench/continual_sft_lora.py`, seed 0:
forgetting 59 % with AdamW, 15 % with SGD); the optimizer wrappers refuse any other optimizer
(`require_sgd`).

The fold changes the adapted layers' base weights, so a checkpoint stores them with the
covariances (`LORA_SUBSPACE_NAME`, written and read by `persistence`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .distributed import agreement, all_reduce_sum
from .errors import ConfigError, EmptyDataError, ImportanceMismatchError, InputTypeError

_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")
_INITS = (True, "gaussian")  # adapter inits that start at ΔW = 0 (B = 0)


def _lora_linears(model: nn.Module, adapter: str) -> dict[str, Any]:
    """The LoRA-adapted nn.Linear layers of `model` carrying `adapter`, by module name."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return {
        n: m for n, m in model.named_modules() if isinstance(m, LoraLinear) and adapter in m.lora_A
    }


def is_lora_model(model: nn.Module) -> bool:
    """A PeftModel with one adapter, a LoRA one adapting at least one nn.Linear. (One adapter
    per task is another design: each task's own adapter, the shared parts element-wise.)"""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    if not isinstance(model, PeftModel) or len(model.peft_config) != 1:
        return False
    return bool(_lora_linears(model, model.active_adapter))


def _fresh_init(model: Any, adapter: str) -> Any:
    """The adapter's `init_lora_weights`, if a fresh adapter with it starts at ΔW = 0."""
    init = model.peft_config[adapter].init_lora_weights
    if init not in _INITS:
        raise ConfigError(
            f"init_lora_weights={init!r}: the LoRA subspace mask folds the adapter after every "
            f"task and starts a fresh one, which must start at ΔW = 0 (one of {_INITS}); or "
            "use SoftMaskConfig(lora_mask='factors')"
        )
    return init


def subspace_keep(covariance: Tensor, scale: float) -> Tensor:
    """K = I − U diag(tanh(λ / (scale · Σλ))) Uᵀ for C = U diag(λ) Uᵀ (λ clamped at 0)."""
    lam, u = torch.linalg.eigh(covariance.double())
    lam = lam.clamp_min(0)
    total = lam.sum()
    if total <= 0:
        return torch.eye(len(lam), dtype=covariance.dtype)
    a = torch.tanh(lam / (scale * total))
    keep = torch.eye(len(lam), dtype=torch.float64) - (u * a) @ u.T
    return keep.to(covariance.dtype)


class LoRASubspace:
    """The subspace mask of one LoRA PeftModel: it owns the covariances and keep matrices.

    `SoftMaskModel` holds one (for `lora_mask="subspace"`) and is its only caller: it puts
    `steps()` into the task's keep-masks, calls `end_task` after the importance pass and hands
    `state_dict()` to `persistence`.
    """

    def __init__(self, model: nn.Module, scale: float) -> None:
        self.model, self.scale = model, scale
        self.adapter = model.active_adapter
        _fresh_init(model, self.adapter)  # every task's fold starts a fresh adapter
        self.layers = _lora_linears(model, self.adapter)
        for n, m in self.layers.items():
            if m.use_dora.get(self.adapter, False) or m.lora_bias.get(self.adapter, False):
                raise ConfigError(
                    f"{n}: DoRA and LoRA bias are not supported by the subspace mask; use "
                    "SoftMaskConfig(lora_mask='factors')"
                )
        self.covariance: dict[str, Tensor] = {}
        self.keep: dict[str, Tensor] = {}

    def _a(self, name: str) -> Tensor:
        return self.layers[name].lora_A[self.adapter].weight

    def parameter_names(self) -> set[str]:
        """Names (in `model.named_parameters()`) of the factors this mask protects: A and B of
        every adapted linear (B needs no mask: a fresh B starts at 0 and acts through A)."""
        return {
            f"{n}.lora_{f}.{self.adapter}.weight" for n in self.layers for f in ("A", "B")
        }

    def steps(self) -> list[tuple[Tensor, Tensor]]:
        """(A, K) of every layer with a finished task: what a masked step applies to A."""
        return [(self._a(n), k) for n, k in self.keep.items()]

    def protection(self) -> dict[str, Tensor]:
        """Per adapted layer the a_k of its input directions, largest first (the eigenvalues of
        I − K; empty before the first task ends): how much of the free space is left."""
        return {
            n: torch.linalg.eigvalsh(torch.eye(len(k)) - k.double().cpu()).flip(0).clamp(0, 1)
            for n, k in self.keep.items()
        }

    def end_task(self, batches: Iterable[Mapping[str, Any]]) -> None:
        """Add this task's input covariances, then fold the adapter and start a fresh masked one."""
        self.add_covariance(batches)
        self.fold()

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
                            "the LoRA subspace pass takes dict batches with 'input_ids' (as a "
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
            raise EmptyDataError("the LoRA subspace pass got no tokens")
        for n in self.layers:
            c = sums[n] / max(count[n], 1)
            self.covariance[n] = self.covariance[n] + c if n in self.covariance else c
            self.keep[n] = subspace_keep(self.covariance[n], self.scale).to(self._a(n).device)

    @torch.no_grad()
    def fold(self) -> None:
        """W ← W + (α/r)·B·A in every adapted layer, a fresh adapter in place (peft's own init:
        B = 0, so the model's function is unchanged), then A ← A·K: it starts in the free
        subspace."""
        init = _fresh_init(self.model, self.adapter)
        for n, m in self.layers.items():
            base = m.get_base_layer()
            base.weight += m.get_delta_weight(self.adapter).to(base.weight.dtype)
            m.reset_lora_parameters(self.adapter, init)
            if n in self.keep:
                a = self._a(n)
                a.copy_(a @ self.keep[n].to(a.dtype))

    # state: what a checkpoint stores ------------------------------------------------------------

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The state's tensor names and shapes: per adapted layer `{layer}.covariance` (in, in)
        and `{layer}.base_weight` (out, in)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for n, m in self.layers.items():
            shapes[f"{n}.covariance"] = (m.in_features, m.in_features)
            shapes[f"{n}.base_weight"] = tuple(m.get_base_layer().weight.shape)
        return shapes

    def state_dict(self) -> dict[str, Tensor]:
        """Per adapted layer the accumulated input covariance (zeros before the first task
        ends) and the base weight with every finished task folded in, float32."""
        state = {}
        for n, m in self.layers.items():
            d = m.in_features
            state[f"{n}.covariance"] = self.covariance.get(n, torch.zeros(d, d)).float()
            state[f"{n}.base_weight"] = m.get_base_layer().weight.detach().float().cpu()
        return {k: v.contiguous() for k, v in state.items()}

    def problems(self, state: Mapping[str, Any]) -> list[str]:
        """Why `state` cannot be loaded onto this model (empty: it can)."""
        expected = self.shapes()
        out = [f"{k}: missing" for k in sorted(set(expected) - set(state))]
        out += [f"{k}: not a LoRA layer of this model" for k in sorted(set(state) - set(expected))]
        for k in sorted(set(expected) & set(state)):
            t = state[k]
            if not isinstance(t, Tensor) or tuple(t.shape) != expected[k] or not t.is_floating_point():
                out.append(f"{k}: expected a float {expected[k]} tensor")
            elif not bool(torch.isfinite(t).all()):
                out.append(f"{k}: not finite")
            elif k.endswith(".covariance") and not torch.allclose(t, t.T, atol=1e-5):
                out.append(f"{k}: not a symmetric covariance")
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore `state_dict()` output (base weights of the adapted layers, covariances);
        checked whole (`problems`) before anything changes."""
        bad = self.problems(state)
        if bad:
            raise ImportanceMismatchError(
                "LoRA subspace state does not fit this model:\n  " + "\n  ".join(bad[:10])
            )
        self.apply(state)

    def apply(self, state: Mapping[str, Tensor]) -> None:
        """Put a state that `problems` accepted onto the model (`load_state_dict` checks first;
        `from_pretrained` applies what `load_checkpoint` already checked)."""
        covariance = {}
        for n in self.layers:
            c = state[f"{n}.covariance"].detach().float().cpu().clone()
            if bool(c.any()):  # zeros: no task finished yet
                covariance[n] = c
        with torch.no_grad():
            for n, m in self.layers.items():
                w = m.get_base_layer().weight
                w.copy_(state[f"{n}.base_weight"].to(device=w.device, dtype=w.dtype))
        self.covariance = covariance
        self.keep = {
            n: subspace_keep(c, self.scale).to(self._a(n).device) for n, c in covariance.items()
        }

    def same_state(self, state: Mapping[str, Tensor]) -> bool:
        """True when `state` is exactly what this mask holds (a resume check)."""
        mine = self.state_dict()
        return mine.keys() == state.keys() and all(torch.equal(mine[k], state[k]) for k in mine)


def subspace_for(model: nn.Module, config: Any) -> LoRASubspace | None:
    """The subspace mask a `SoftMaskConfig` asks for on `model`: None unless `model` is a LoRA
    PeftModel, `config.lora_mask == "subspace"` and the method is SPG (DAS refuses LoRA)."""
    if config.lora_mask != "subspace" or config.method != "spg" or not is_lora_model(model):
        return None
    return LoRASubspace(model, config.lora_subspace_scale)


def require_sgd(optimizer: Any) -> None:
    """Refuse to train a subspace-masked LoRA model with anything but torch.optim.SGD."""
    if not isinstance(optimizer, torch.optim.SGD):
        raise ConfigError(
            f"the LoRA subspace mask needs torch.optim.SGD, got {type(optimizer).__name__}: "
            "Adam-family steps normalise B's update, so the masked A protects little (module "
            "lora_subspace). Train with SGD (Trainer: optim='sgd', a learning rate about 10x "
            "AdamW's) or set SoftMaskConfig(lora_mask='factors')"
        )


def elementwise_masked(masked: list[str], subspace: LoRASubspace | None) -> list[str]:
    """The masked parameters the method's element-wise importance covers: all of them, less
    the LoRA factors a subspace mask protects."""
    if subspace is None:
        return masked
    factors = subspace.parameter_names()
    return [n for n in masked if n not in factors]


__all__ = [
    "LoRASubspace",
    "elementwise_masked",
    "is_lora_model",
    "require_sgd",
    "subspace_for",
    "subspace_keep",
]
