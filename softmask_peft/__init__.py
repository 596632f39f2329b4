"""softmask-peft: continual learning without forgetting by soft-masking gradients.

Public API: `SoftMaskConfig` (with the methods' own `SPGConfig` / `DASConfig`), `SoftMaskModel`,
`get_softmask_model`, `SoftMaskOptimizer`, `MultiHeadClassifier`, `TaskRecord`, `CapacityReport`
(what `SoftMaskModel.capacity()` returns), and the
exception types (all subclasses of `SoftMaskError`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from softmask_format import __version__

from .errors import (
    BatchError,
    ConfigError,
    CorruptFileError,
    DistributedError,
    EmptyDataError,
    ImportanceMismatchError,
    InputTypeError,
    MissingFileError,
    NonFiniteGradientError,
    SaveLocationError,
    SoftMaskError,
    TargetModulesError,
    TaskOrderError,
    UnsupportedFormatError,
    WeightsMismatchError,
)

if TYPE_CHECKING:
    from .capacity import CapacityReport
    from .config import SoftMaskConfig
    from .heads import MultiHeadClassifier
    from .importance import DASConfig, SPGConfig
    from .model import SoftMaskModel, get_softmask_model
    from .optim import SoftMaskOptimizer
    from .store import TaskRecord

# imported on first use (PEP 562), so the command line and `softmask_peft.errors` stay free of
# torch until the API is touched
_LAZY = {
    "SoftMaskConfig": ".config",
    "SoftMaskModel": ".model",
    "get_softmask_model": ".model",
    "SoftMaskOptimizer": ".optim",
    "MultiHeadClassifier": ".heads",
    "SPGConfig": ".importance",
    "DASConfig": ".importance",
    "TaskRecord": ".store",
    "CapacityReport": ".capacity",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BatchError",
    "CapacityReport",
    "ConfigError",
    "CorruptFileError",
    "DistributedError",
    "DASConfig",
    "EmptyDataError",
    "ImportanceMismatchError",
    "InputTypeError",
    "MissingFileError",
    "MultiHeadClassifier",
    "NonFiniteGradientError",
    "SPGConfig",
    "SaveLocationError",
    "SoftMaskConfig",
    "SoftMaskError",
    "SoftMaskModel",
    "SoftMaskOptimizer",
    "TargetModulesError",
    "TaskOrderError",
    "TaskRecord",
    "UnsupportedFormatError",
    "WeightsMismatchError",
    "__version__",
    "get_softmask_model",
]
