"""softmask-peft: continual learning without forgetting by soft-masking gradients.

Public API: `SoftMaskConfig`, `SoftMaskModel`, `get_softmask_model`, `SoftMaskOptimizer`,
and the exception types in `softmask_peft.errors`.
"""

from .config import SoftMaskConfig
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
from .model import SoftMaskModel
from .optim import SoftMaskOptimizer

__version__ = "0.1.0"


def get_softmask_model(model, config: SoftMaskConfig) -> SoftMaskModel:
    """Wrap `model` (any nn.Module, transformers model or PeftModel) for soft-masked continual learning."""
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
    "get_softmask_model",
]
