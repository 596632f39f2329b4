"""softmask-peft: continual learning without forgetting by soft-masking gradients.

Public API: `SoftMaskConfig` (with the methods' own `SPGConfig` / `DASConfig`), `SoftMaskModel`,
`get_softmask_model`, `SoftMaskOptimizer`, `MultiHeadClassifier`, `TaskRecord`, and the
exception types (all subclasses of `SoftMaskError`).
"""

from .config import SoftMaskConfig
from .errors import (
    BatchError,
    ConfigError,
    CorruptFileError,
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
from .heads import MultiHeadClassifier
from .importance import DASConfig, SPGConfig
from .model import SoftMaskModel
from .optim import SoftMaskOptimizer
from .store import TaskRecord

__version__ = "0.2.0"


def get_softmask_model(model, config: SoftMaskConfig) -> SoftMaskModel:
    """Wrap `model` (any nn.Module, transformers model or PeftModel) for soft-masked continual learning."""
    return SoftMaskModel(model, config)


__all__ = [
    "BatchError",
    "ConfigError",
    "CorruptFileError",
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
    "get_softmask_model",
]
