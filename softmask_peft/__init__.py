"""softmask-peft: continual learning without forgetting by soft-masking gradients.

Public API: `SoftMaskConfig`, `SoftMaskModel`, `get_softmask_model`, `SoftMaskOptimizer`,
and the exception types in `softmask_peft.errors`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from softmask_format import __version__

from .errors import (
    ConfigError,
    CorruptFileError,
    EmptyDataError,
    ImportanceMismatchError,
    MissingFileError,
    NonFiniteGradientError,
    SaveLocationError,
    SoftMaskError,
    TargetModulesError,
    TaskOrderError,
    UnsupportedFormatError,
)

if TYPE_CHECKING:
    from .config import SoftMaskConfig
    from .model import SoftMaskModel
    from .optim import SoftMaskOptimizer

# imported on first use (PEP 562), so the command line and `softmask_peft.errors` stay free of
# torch until the API is touched
_LAZY = {
    "SoftMaskConfig": ".config",
    "SoftMaskModel": ".model",
    "SoftMaskOptimizer": ".optim",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_softmask_model(model, config: SoftMaskConfig) -> SoftMaskModel:
    """Wrap `model` (any nn.Module, transformers model or PeftModel) for soft-masked continual learning."""
    from .model import SoftMaskModel

    return SoftMaskModel(model, config)


__all__ = [
    "ConfigError",
    "CorruptFileError",
    "EmptyDataError",
    "ImportanceMismatchError",
    "MissingFileError",
    "NonFiniteGradientError",
    "SaveLocationError",
    "SoftMaskConfig",
    "SoftMaskError",
    "SoftMaskModel",
    "SoftMaskOptimizer",
    "TargetModulesError",
    "TaskOrderError",
    "UnsupportedFormatError",
    "__version__",
    "get_softmask_model",
]
