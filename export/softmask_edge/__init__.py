"""softmask_edge: on-device continual learning with ONNX Runtime Training (no torch).

`build_artifacts` turns a forward ONNX graph into training artifacts with soft-masking inside
the training graph; `EdgeLearner` learns new tasks from them, computes and accumulates their
importance with an ONNX graph, and saves atomically. Depends on numpy, onnx and
onnxruntime-training only; importing this package never imports torch.
"""

import importlib.util
import sys

import softmask_format

from .errors import RuntimeUnavailableError

# the wheels that exist: onnxruntime-training-cpu 1.19.2 (the last training release) for
# CPython 3.8-3.12, onnx < 1.17 (newer onnx writes IR versions ORT 1.19 refuses)
LAST_RUNTIME_PYTHON = (3, 12)


def _check_runtime() -> None:
    """A clear error, at import, when the device runtime is missing (not a ModuleNotFoundError
    from deep inside a submodule)."""
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if not missing:
        return
    here = ".".join(map(str, sys.version_info[:2]))
    if sys.version_info[:2] > LAST_RUNTIME_PYTHON:
        advice = (
            f"ONNX Runtime Training has no build for Python {here} (onnxruntime-training-cpu "
            "1.19.2, the last release, has wheels for Python 3.8-3.12): run the device side on "
            "Python 3.12 or older; the PyTorch side (softmask_peft) works on this Python"
        )
    else:
        advice = "install it with: pip install 'softmask-peft[onnx]'"
    raise RuntimeUnavailableError(
        f"softmask_edge needs {' and '.join(missing)} (onnxruntime-training-cpu==1.19.2, "
        f"onnx<1.17), not installed here; {advice}"
    )


_check_runtime()

from .builder import build_artifacts  # noqa: E402
from .checkpoint import DeviceCheckpoint, read_device_checkpoint  # noqa: E402
from .errors import (  # noqa: E402
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
from .learner import EdgeLearner  # noqa: E402
from .manifest import Manifest  # noqa: E402
from .schedule import EarlyStopping  # noqa: E402

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
    "RuntimeUnavailableError",
    "SaveLocationError",
    "StaleWriterError",
    "TaskOrderError",
    "UnsupportedFormatError",
    "build_artifacts",
    "read_device_checkpoint",
]
