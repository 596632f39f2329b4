"""SoftMaskOptimizer: any torch.optim.Optimizer, with soft-masking around its step."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from .errors import ConfigError, InputTypeError
from .lora_subspace import require_sgd
from .masking import (
    MASK_MODES,
    MASK_TRANSFORMS,
    KeepMasks,
    base_step,
    refuse_non_finite_gradients,
)

# a SoftMaskModel, a KeepMasks value, or a callable returning the current KeepMasks (or None)
MaskSource = Any


def resolve_mask_mode(mode: str, base: Optimizer) -> str:
    """'auto' -> 'grad' for torch.optim.SGD (the paper's optimizer), 'update' for any other.

    Adam-family optimizers normalise a constant per-element gradient scale away (m / sqrt(v)),
    so grad masking barely protects under them; update masking protects under any optimizer.
    """
    if mode not in MASK_MODES:
        raise ConfigError(f"mask_mode must be one of {MASK_MODES}, got {mode!r}")
    if mode == "auto":
        return "grad" if isinstance(base, torch.optim.SGD) else "update"
    if mode == "grad" and not isinstance(base, torch.optim.SGD):
        warnings.warn(
            f"mask_mode='grad' with {type(base).__name__}: adaptive optimizers rescale masked "
            "gradients back up, so old tasks are barely protected; use mask_mode='update' "
            "(or 'auto')",
            stacklevel=3,
        )
    return mode


class SoftMaskOptimizer(Optimizer):
    """Wrap `base` so each step is soft-masked by accumulated importance.

    `masks` is where the keep-masks come from: a `SoftMaskModel` (its current task's masks),
    a `KeepMasks` value, or a callable returning one (or None: no masking), in the spirit of
    optax's `masked`. mask_mode="grad" (the paper): `grad *= 1 - A` before `base.step()`; with
    plain SGD the update of each element is scaled exactly by 1 - A. mask_mode="update":
    `p <- p_old + (1 - A) ⊙ (p_new - p_old)` after `base.step()`, which protects under any
    optimizer. "auto" (default) picks grad for SGD, update otherwise. Heads use the scalar 1 - ā.

    Keeps torch.optim's contract: `param_groups`, `state`, `defaults`, `zero_grad`,
    `state_dict` / `load_state_dict` are the base optimizer's, so LR schedulers attach to it.
    Parameters that `begin_task` adds (a new task's head, listed in `KeepMasks.added`) are
    appended to the first param group at the next step, so they train with its options and
    schedulers see no new group. Step hooks (`register_step_pre_hook` / `_post_hook`) run
    around the masked step; state-dict hooks are registered on the base optimizer.

    A step whose gradients hold NaN or Inf raises `NonFiniteGradientError` before anything
    is written (with a closure: after each evaluation).

    Lifecycle guards (warnings, since both can be deliberate): a step without masks (no task
    begun) warns once and steps unmasked; a base optimizer holding none of the model's masked
    parameters (a frozen backbone?) warns at construction.
    """

    def __init__(self, base: Optimizer, masks: MaskSource, mask_mode: str | None = None) -> None:
        if not isinstance(base, Optimizer):
            raise InputTypeError(
                f"base must be a torch.optim.Optimizer, got {type(base).__name__}"
            )
        self._source = _mask_source(masks, base)
        named = getattr(getattr(masks, "base_model", None), "named_parameters", None)
        self._names = {id(p): n for n, p in named()} if callable(named) else {}
        default = getattr(getattr(masks, "softmask_config", None), "mask_mode", "auto")
        self.base = base
        self.mask_mode = resolve_mask_mode(default if mask_mode is None else mask_mode, base)
        self._mask = MASK_TRANSFORMS[self.mask_mode]()
        self._seen = self._source()  # heads added before us: the caller's choice to include
        self._warned = False
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base.param_groups = value

    @property
    def state(self) -> Any:
        return self.base.state

    @state.setter
    def state(self, value: Any) -> None:
        self.base.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.base.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.base.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)

    def register_state_dict_pre_hook(self, hook: Callable, prepend: bool = False) -> Any:
        """Registered on the base optimizer, which produces the state dict."""
        return self.base.register_state_dict_pre_hook(hook, prepend)

    def register_state_dict_post_hook(self, hook: Callable, prepend: bool = False) -> Any:
        return self.base.register_state_dict_post_hook(hook, prepend)

    def register_load_state_dict_pre_hook(self, hook: Callable, prepend: bool = False) -> Any:
        return self.base.register_load_state_dict_pre_hook(hook, prepend)

    def register_load_state_dict_post_hook(self, hook: Callable, prepend: bool = False) -> Any:
        return self.base.register_load_state_dict_post_hook(hook, prepend)

    def __repr__(self) -> str:
        return f"SoftMaskOptimizer(mask_mode={self.mask_mode!r}, base={self.base!r})"

    def _current(self) -> KeepMasks | None:
        """This step's masks; on new masks, adopt the parameters they were created with."""
        masks = self._source()
        if masks is not self._seen:
            self._seen = masks
            if masks is not None and masks.added:
                known = {id(p) for g in self.base.param_groups for p in g["params"]}
                self.base.param_groups[0]["params"].extend(
                    p for p in masks.added if id(p) not in known
                )
        if masks is None and not self._warned:
            self._warned = True
            warnings.warn(
                "SoftMaskOptimizer.step() with no task begun: this step is not masked; call "
                "model.begin_task(t) before training each task",
                stacklevel=3,
            )
        return masks

    @Optimizer.profile_hook_step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One masked step; a closure is passed to the base optimizer (LBFGS calls it repeatedly).

        Hooks follow torch's contract for every `Optimizer.step` call: this wrapper's hooks and
        torch's global ones run around the whole masked step (post-hooks see the final
        parameters); the base optimizer's step, inside, runs its own hooks and the global ones
        again, with the base optimizer as their `optimizer` argument, before update masking.
        """
        masks = self._current()
        if closure is None:
            self._refuse_non_finite()
        else:
            closure = self._checked(closure)
        if masks is None:
            return base_step(self.base, closure)
        return self._mask.step(self.base, masks, closure)

    def _refuse_non_finite(self) -> None:
        """Nothing is written when a gradient holds NaN or Inf (`NonFiniteGradientError`)."""
        params = (p for g in self.base.param_groups for p in g["params"])
        refuse_non_finite_gradients(params, self._names)

    def _checked(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        def checked() -> Any:
            loss = closure()
            self._refuse_non_finite()
            return loss

        return checked

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class _FromModel:
    """The masks of a `SoftMaskModel`'s open task (an object, so deepcopy copies the model)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self) -> KeepMasks | None:
        return self.model.keep_masks


class _Fixed:
    def __init__(self, masks: KeepMasks) -> None:
        self.masks = masks

    def __call__(self) -> KeepMasks:
        return self.masks


def _mask_source(masks: MaskSource, base: Optimizer) -> Callable[[], KeepMasks | None]:
    """A callable returning the current masks, from a model, a KeepMasks value or a callable."""
    if isinstance(masks, KeepMasks):
        return _Fixed(masks)
    if hasattr(masks, "keep_masks") and hasattr(masks, "masked_parameter_names"):
        if getattr(masks, "lora_subspace", None) is not None:
            require_sgd(base)
        held = {id(p) for g in base.param_groups for p in g["params"]}
        named = dict(masks.base_model.named_parameters())
        if not any(id(named[n]) in held for n in masks.masked_parameter_names):
            warnings.warn(
                "the base optimizer holds none of the model's masked parameters: only heads "
                "(or nothing) will train and nothing is soft-masked; build it from "
                "model.parameters() unless the backbone is frozen on purpose",
                stacklevel=3,
            )
        return _FromModel(masks)
    if callable(masks) and not isinstance(masks, torch.nn.Module):
        return masks
    raise InputTypeError(
        "masks must be a SoftMaskModel, a KeepMasks or a callable returning KeepMasks, got "
        f"{type(masks).__name__} (wrap the model with get_softmask_model first)"
    )
