"""Exception types. Each subclasses the builtin a caller would catch anyway (ValueError, ...)."""

from __future__ import annotations


class SoftMaskError(Exception):
    """Base class of every error softmask-peft raises on purpose."""


class ConfigError(SoftMaskError, ValueError):
    """A configuration value or combination is invalid."""


class TargetModulesError(ConfigError):
    """`target_modules` / `exclude_modules` / `head_modules` select nothing or overlap badly."""


class ImportanceMismatchError(SoftMaskError, ValueError):
    """Stored importance does not fit the model (keys, shapes, value range)."""


class UnsupportedFormatError(SoftMaskError, ValueError):
    """A saved file carries a format version this release does not know."""


class CorruptFileError(SoftMaskError, ValueError):
    """A saved file exists but cannot be parsed (truncated, wrong content)."""


class MissingFileError(SoftMaskError, FileNotFoundError):
    """A file that a saved directory must contain is absent."""


class SaveLocationError(SoftMaskError, NotADirectoryError):
    """The save target exists and is not a directory."""


class EmptyDataError(SoftMaskError, ValueError):
    """An importance pass was given no batches."""


class NonFiniteGradientError(SoftMaskError, FloatingPointError):
    """The importance pass produced NaN or Inf gradients."""


class DistributedError(SoftMaskError, RuntimeError):
    """Data-parallel ranks disagree (another model, a failed pass on one rank) or one is gone."""


class TaskOrderError(SoftMaskError, RuntimeError):
    """`begin_task` / `end_task` called out of order."""


class WeightsMismatchError(SoftMaskError, ValueError):
    """Saved weights do not fit the model they are loaded into (another architecture?)."""


class BatchError(SoftMaskError, ValueError):
    """A batch has the wrong structure, lacks labels, or holds labels out of range."""


class InputTypeError(SoftMaskError, TypeError):
    """An argument has the wrong type (e.g. a plain module where a SoftMaskModel is needed)."""
