"""softmask_edge: on-device continual learning with ONNX Runtime Training (no torch).

`build_artifacts` turns a forward ONNX graph into training artifacts with soft-masking inside
the training graph; `EdgeLearner` learns new tasks from them, computes and accumulates their
importance with an ONNX graph, and saves atomically. ONNX Runtime artifacts need numpy, onnx
and onnxruntime-training; ExecuTorch artifacts (softmask_peft's export_for_device(...,
runtime="executorch")) need numpy and executorch, so onnx and onnxruntime are imported only
when used. Importing this package never imports torch (nor onnx, nor onnxruntime).
"""

import softmask_format

from .checkpoint import DeviceCheckpoint, read_device_checkpoint
from .errors import (
    ArgumentError,
    ArtifactMismatchError,
    BatchError,
    CorruptArtifactError,
    EdgeError,
    EmptyDataError,
    ExecuTorchError,
    ExportError,
    MissingArtifactError,
    NonFiniteGradientError,
    OnnxRuntimeError,
    RuntimeUnavailableError,
    SaveLocationError,
    StaleWriterError,
    TaskOrderError,
    UnsupportedFormatError,
)
from .learner import EdgeLearner
from .manifest import Manifest
from .schedule import EarlyStopping

__version__ = softmask_format.__version__


def __getattr__(name: str):
    """`build_artifacts` on first use: it needs onnx and onnxruntime-training (PEP 562)."""
    if name == "build_artifacts":
        from .availability import require_onnx_runtime

        require_onnx_runtime()
        from .builder import build_artifacts

        return build_artifacts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "ExecuTorchError",
    "ExportError",
    "Manifest",
    "MissingArtifactError",
    "NonFiniteGradientError",
    "OnnxRuntimeError",
    "RuntimeUnavailableError",
    "SaveLocationError",
    "StaleWriterError",
    "TaskOrderError",
    "UnsupportedFormatError",
    "build_artifacts",
    "read_device_checkpoint",
]
