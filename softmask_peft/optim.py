"""SoftMaskOptimizer: any torch.optim.Optimizer, with soft-masking around its step (DESIGN §4)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch.optim import Optimizer

from .config import MASK_MODES
from .errors import ConfigError
from .masking import MASK_TRANSFORMS, KeepMasks, base_step

if TYPE_CHECKING:
    from .model import SoftMaskModel


class SoftMaskOptimizer(Optimizer):
    """Wrap `base` so each step is soft-masked by `model`'s accumulated importance.

    mask_mode="grad" (the paper): `grad *= 1 - A` before `base.step()`; with plain SGD the
    update of each element is scaled exactly by 1 - A. mask_mode="update":
    `p <- p_old + (1 - A) ⊙ (p_new - p_old)` after `base.step()`, which protects under any
    optimizer (Adam normalises a constant gradient scale away). Heads use the scalar 1 - ā.

    Keeps torch.optim's contract: `param_groups`, `state`, `defaults`, `zero_grad`,
    `state_dict` / `load_state_dict` are the base optimizer's, so LR schedulers attach to it.
    Parameters that `begin_task` adds to the model (a new task's head) are appended to the first
    param group at the next step, so they train with its options and schedulers see no new group.
    Step hooks (`register_step_pre_hook` / `_post_hook`) run around the masked step; state-dict
    hooks are registered on the base optimizer, which produces the state dict.
    """

    def __init__(self, base: Optimizer, model: SoftMaskModel, mask_mode: str | None = None) -> None:
        if not isinstance(base, Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer, got {type(base).__name__}")
        mode = model.softmask_config.mask_mode if mask_mode is None else mask_mode
        if mode not in MASK_MODES:
            raise ConfigError(f"mask_mode must be one of {MASK_MODES}, got {mode!r}")
        self.base = base
        self.model = model
        self.mask_mode = mode
        self._mask = MASK_TRANSFORMS[mode]()
        self._masks_version = -1
        self._adopted = len(model.added_parameters)  # heads added before us: the caller's choice
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

    def _refresh(self) -> KeepMasks | None:
        """Pick up the keep-masks (and any new parameters) after `begin_task` or `model.to()`."""
        if self.model.mask_version != self._masks_version:
            known = {id(p) for g in self.base.param_groups for p in g["params"]}
            new = [p for p in self.model.added_parameters[self._adopted :] if id(p) not in known]
            self._adopted = len(self.model.added_parameters)
            if new:
                self.base.param_groups[0]["params"].extend(new)
        if self.model.keep_masks is not None and self.model.keep_masks.stale():
            self.model.refresh_masks()
        self._masks_version = self.model.mask_version
        return self.model.keep_masks

    @Optimizer.profile_hook_step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One masked step; a closure is passed to the base optimizer (LBFGS calls it repeatedly).

        Hooks follow torch's contract for every `Optimizer.step` call: this wrapper's hooks and
        torch's global ones run around the whole masked step (post-hooks see the final
        parameters); the base optimizer's step, inside, runs its own hooks and the global ones
        again, with the base optimizer as their `optimizer` argument, before update masking.
        """
        masks = self._refresh()
        if masks is None:
            return base_step(self.base, closure)
        return self._mask.step(self.base, masks, closure)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
