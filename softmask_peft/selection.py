"""Which parameters are soft-masked and which are heads, by PEFT's own module matcher."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from torch import nn

from .config import SoftMaskConfig
from .errors import TargetModulesError


def matching_modules(model: nn.Module, patterns: list[str] | str) -> set[str]:
    """Names of the modules PEFT would target with `target_modules=patterns`."""
    from peft.tuners.tuners_utils import check_target_module_exists  # peft is slow to import

    spec = SimpleNamespace(target_modules=patterns, exclude_modules=None, target_parameters=None)
    return {
        name for name, _ in model.named_modules() if name and check_target_module_exists(spec, name)
    }


def _under(param_name: str, modules: set[str]) -> bool:
    parts = param_name.split(".")
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts)))


TASK_HEADS = ("classifier", "score")


def default_head_modules(model: nn.Module) -> list[str]:
    """Heads to assume when `head_modules` is None: those of a transformers task model.

    A PEFT model's `modules_to_save` (the task head PEFT trains in full) and, in a transformers
    model, the modules named like its task heads (`classifier`, `score`); otherwise none.
    Masking a freshly initialised head like a backbone weight would stop it learning the next task.
    """
    transformers = sys.modules.get("transformers")  # not imported: not a transformers model
    heads = {
        name
        for config in (getattr(model, "peft_config", None) or {}).values()
        for name in (getattr(config, "modules_to_save", None) or [])
    }
    if heads or (transformers is not None and isinstance(model, transformers.PreTrainedModel)):
        heads.update(n.rsplit(".", 1)[-1] for n in matching_modules(model, list(TASK_HEADS)))
    return sorted(heads)


def select_parameters(model: nn.Module, config: SoftMaskConfig) -> tuple[list[str], list[str]]:
    """Return (masked, heads): trainable parameter names, in `named_parameters()` order.

    masked = parameters under a `target_modules` match (all, when None), minus those under
    `exclude_modules` or `head_modules`; heads = parameters under `head_modules` (when None:
    `default_head_modules`; pass `[]` for no heads).
    """
    heads: set[str] = set()
    if config.head_modules is None:
        found = default_head_modules(model)
        heads = matching_modules(model, found) if found else set()
    elif config.head_modules:
        heads = matching_modules(model, config.head_modules)
        if not heads:
            raise TargetModulesError(f"head_modules={config.head_modules!r} matches no module")
    targets = (
        None if config.target_modules is None else matching_modules(model, config.target_modules)
    )
    if targets is not None and not targets:
        names = [n for n, _ in model.named_modules() if n][:12]
        raise TargetModulesError(
            f"target_modules={config.target_modules!r} matches no module; module names look like: "
            + ", ".join(names)
        )
    excluded = matching_modules(model, config.exclude_modules) if config.exclude_modules else set()
    masked, head_params = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _under(name, heads):
            head_params.append(name)
        elif (targets is None or _under(name, targets)) and not _under(name, excluded):
            masked.append(name)
    if not masked:
        raise TargetModulesError(
            "no trainable parameter is left to mask "
            f"(target_modules={config.target_modules!r}, exclude_modules={config.exclude_modules!r}, "
            f"head_modules={config.head_modules!r}); a PeftModel loaded for inference has no "
            "trainable parameter: load it with PeftModel.from_pretrained(..., is_trainable=True)"
        )
    return masked, head_params
