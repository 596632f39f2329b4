"""softmask_edge: on-device continual learning with ONNX Runtime Training (no torch).

`build_artifacts` turns a forward ONNX graph into training artifacts with soft-masking inside
the training graph; `EdgeLearner` learns new tasks from them, computes and accumulates their
importance with an ONNX graph, and saves atomically. Depends on numpy, onnx and
onnxruntime-training only; importing this package never imports torch.
"""

import softmask_format

from .builder import build_artifacts
from .checkpoint import DeviceCheckpoint, read_device_checkpoint
from .errors import (
    ArgumentError,
    ArtifactMismatchError,
    BatchError,
    CorruptArtifactError,
    EdgeError,
    EmptyDataError,
    ExportError,
    MissingArtifactError,
    NonFiniteGradientError,
    OnnxRuntimeError,
    SaveLocationError,
    StaleWriterError,
    TaskOrderError,
    UnsupportedFormatError,
)
from .learner import EdgeLearner
from .manifest import Manifest
from .schedule import EarlyStopping

__version__ = softmask_format.__version__


__all__ = [
    "ArgumentError",
    "ArtifactMismatchError",
    "BatchError",
    "CorruptArtifactError",
    "DeviceCheckpoint",
    "EarlyStopping",
    "EdgeError",
    "EdgeLearner",
    "EmptyDataError",
    "ExportError",
    "Manifest",
    "MissingArtifactError",
    "NonFiniteGradientError",
    "OnnxRuntimeError",
    "SaveLocationError",
    "StaleWriterError",
    "TaskOrderError",
    "UnsupportedFormatError",
    "build_artifacts",
    "read_device_checkpoint",
]
