"""SoftMaskConfig: what to protect and how, saved as JSON beside the weights (PEFT style)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ._atomic import atomic_write_text, ensure_directory
from .constants import CONFIG_NAME, FORMAT_VERSION, IMPORTANCE_DTYPES
from .errors import ConfigError, CorruptFileError, MissingFileError, UnsupportedFormatError

METHODS = ("spg", "das")
MASK_MODES = ("grad", "update")
CONTRASTIVE_POSITIVES = ("detached", "grad")
UNIT_DROPOUT_MODES = ("auto", "on", "off")


def _modules_field(help_text: str) -> Any:
    return field(default=None, metadata={"help": help_text})


@dataclass
class SoftMaskConfig:
    """Configuration of a soft-masked model.

    Module selection uses PEFT's own matching rules (`peft.tuners.tuners_utils.
    check_target_module_exists`): a string is a full-match regex over module names, a list
    matches a module whose name equals an entry or ends with `"." + entry`.
    """

    method: str = field(default="spg", metadata={"help": f"importance method, one of {METHODS}"})
    mask_mode: str = field(
        default="grad",
        metadata={
            "help": "'grad': grad *= 1 - A (the paper); 'update': scale the optimizer's "
            "parameter change by 1 - A (protects under Adam-family optimizers too)"
        },
    )
    target_modules: list[str] | str | None = _modules_field(
        "modules whose parameters are soft-masked; None = every parameter outside the heads"
    )
    exclude_modules: list[str] | str | None = _modules_field(
        "modules never masked (PEFT matching rules)"
    )
    head_modules: list[str] | str | None = _modules_field(
        "classifier heads: their gradients are scaled by one scalar 1 - mean(A)"
    )
    importance_dtype: str = field(
        default="float32", metadata={"help": f"dtype on disk, one of {IMPORTANCE_DTYPES}"}
    )
    das_units: dict[str, Any] | None = field(
        default=None, metadata={"help": "DAS: declare attention/FFN modules by hand (see DAS docs)"}
    )
    contrastive_weight: float = field(
        default=0.1,
        metadata={
            "help": "DAS: weight of the contrastive integration loss (0.1: at 1.0 it stalled "
            "domain learning of a causal LM; see bench/das_causal_lm.py)"
        },
    )
    contrastive_temperature: float = field(
        default=0.05, metadata={"help": "DAS: InfoNCE temperature"}
    )
    contrastive_positive: str = field(
        default="detached",
        metadata={
            "help": f"DAS: the positive view, one of {CONTRASTIVE_POSITIVES}: 'detached' = a "
            "second forward without gradient, batched with the 'general' forward (one extra "
            "no-grad pass per step); 'grad' = a second forward with gradient (the paper; one "
            "extra forward + backward)"
        },
    )
    unit_dropout: str = field(
        default="auto",
        metadata={
            "help": f"DAS general importance, one of {UNIT_DROPOUT_MODES}: dropout on the unit "
            "outputs during the proxy-KL pass; 'auto' = only when the model's own dropout "
            "gives no signal (the first batch's proxy KL is exactly 0, e.g. Llama)"
        },
    )
    unit_dropout_rate: float = field(
        default=0.1, metadata={"help": "DAS: rate of that unit dropout (BERT's dropout is 0.1)"}
    )
    task_names: list[str] = field(
        default_factory=list, metadata={"help": "names of the learned tasks, in order"}
    )
    task_num_classes: list[int | None] = field(
        default_factory=list, metadata={"help": "classes of each task's head (per-task heads)"}
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.mask_mode not in MASK_MODES:
            raise ConfigError(f"mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}")
        if self.importance_dtype not in IMPORTANCE_DTYPES:
            raise ConfigError(
                f"importance_dtype must be one of {IMPORTANCE_DTYPES}, got {self.importance_dtype!r}"
            )
        for name in ("target_modules", "exclude_modules", "head_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                value = sorted(value)
                setattr(self, name, value)
            if value is not None and not isinstance(value, (str, list)):
                raise ConfigError(f"{name} must be a str, a list of str or None, got {value!r}")
            if isinstance(value, list) and not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must contain only strings, got {value!r}")
        if not self.contrastive_temperature > 0:
            raise ConfigError(
                f"contrastive_temperature must be > 0, got {self.contrastive_temperature!r}"
            )
        if not self.contrastive_weight >= 0:
            raise ConfigError(f"contrastive_weight must be >= 0, got {self.contrastive_weight!r}")
        if self.contrastive_positive not in CONTRASTIVE_POSITIVES:
            raise ConfigError(
                f"contrastive_positive must be one of {CONTRASTIVE_POSITIVES}, "
                f"got {self.contrastive_positive!r}"
            )
        if self.unit_dropout not in UNIT_DROPOUT_MODES:
            raise ConfigError(
                f"unit_dropout must be one of {UNIT_DROPOUT_MODES}, got {self.unit_dropout!r}"
            )
        if not 0 < self.unit_dropout_rate < 1:
            raise ConfigError(
                f"unit_dropout_rate must be in (0, 1), got {self.unit_dropout_rate!r} "
                "(to disable the unit dropout set unit_dropout='off')"
            )
        if len(self.task_num_classes) not in (0, len(self.task_names)):
            raise ConfigError("task_num_classes must be empty or as long as task_names")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, including the format version."""
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SoftMaskConfig:
        """Build from `to_dict()` output; unknown keys or an unknown format version raise."""
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"softmask config format_version {version!r} is not supported "
                f"(this release reads {FORMAT_VERSION})"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown SoftMaskConfig keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return cls(**data)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `softmask_config.json` (indented, key-sorted) atomically."""
        path = ensure_directory(directory) / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> SoftMaskConfig:
        """Read `softmask_config.json` from `directory`."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise MissingFileError(f"no {CONFIG_NAME} in {str(directory)!r}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise CorruptFileError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)
