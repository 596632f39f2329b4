"""Exception types of the edge package (torch-free, so it cannot reuse softmask_peft.errors).

Each subclasses the builtin a caller would catch anyway; the names mirror softmask_peft's.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base class of every error softmask_edge raises on purpose."""


class RuntimeUnavailableError(EdgeError, ImportError):
    """ONNX Runtime Training (or onnx) is not installed, or cannot be on this Python."""


class ArtifactMismatchError(EdgeError, ValueError):
    """Artifacts, checkpoint or weights belong to a different model (names, shapes, dtypes)."""


class MissingArtifactError(EdgeError, FileNotFoundError):
    """A file the artifacts directory must contain is absent."""


class CorruptArtifactError(EdgeError, ValueError):
    """A file exists but its content is damaged (checksum, JSON, unreadable)."""


class UnsupportedFormatError(EdgeError, ValueError):
    """The manifest carries a format version this release does not know."""


class BatchError(EdgeError, ValueError):
    """A batch does not match the exported inputs (names, dtypes, shapes, label range)."""


class EmptyDataError(EdgeError, ValueError):
    """A training or importance pass was given no batches."""


class NonFiniteGradientError(EdgeError, FloatingPointError):
    """The importance pass produced NaN or Inf gradients."""


class TaskOrderError(EdgeError, RuntimeError):
    """No declared head is left for a new task, or a task id is out of range."""


class ExportError(EdgeError, ValueError):
    """The model or the export options cannot be turned into training artifacts."""


class StaleWriterError(EdgeError, RuntimeError):
    """The folder moved on since this learner loaded it: another writer saved a newer generation."""


class SaveLocationError(EdgeError, OSError):
    """The save location cannot be written (disk full, read-only, not a directory); nothing changed."""


class OnnxRuntimeError(EdgeError, RuntimeError):
    """onnxruntime failed inside a step; the message names the step and file."""


class ArgumentError(EdgeError, ValueError):
    """An argument of a public call is out of range (epochs, learning rate)."""


class ExecuTorchError(EdgeError, RuntimeError):
    """The ExecuTorch runtime failed inside a step, or is not installed; the message names it."""
