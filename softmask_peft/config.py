"""SoftMaskConfig: how to protect (method, mask mode, selection), saved as JSON (PEFT style).

A config describes how to adapt, never what happened in a run: the task log lives in the
importance store. Method-specific options live in the method's own config (`SPGConfig`,
`DASConfig`), chosen by `method`, the JSON's discriminator:

    {"format_version": 4, "method": "das", "method_config": {"contrastive_weight": 0.1, ...}, ...}

Capacity options (`importance_sharpness`, `importance_budget`, `importance_decay`; format 4)
decide how each task's importance is kept; configs of formats 1-3 load with the paper's rule.
`lora_mask` (format 5) says how a LoRA PeftModel is protected; configs of formats 1-4 load with
"factors", what they were trained with.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from softmask_format.atomic import atomic_write_text, ensure_directory
from softmask_format.names import (
    CONFIG_NAME,
    FORMAT_VERSION,
    IMPORTANCE_DTYPES,
    READABLE_FORMAT_VERSIONS,
)

from .errors import (
    ConfigError,
    CorruptFileError,
    MissingFileError,
    SaveLocationError,
    UnsupportedFormatError,
)
from .importance import METHODS, method_spec
from .masking import MASK_MODES

MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes; refuse to parse megabytes
_LEGACY_METHOD_KEYS = {  # format 1 kept DAS's options at the top level
    "das_units": "units",
    "contrastive_weight": "contrastive_weight",
    "contrastive_temperature": "contrastive_temperature",
}
LEGACY_TASK_KEYS = ("task_names", "task_num_classes")  # format 1 kept the task log here
HEAD_SCALINGS = ("all", "except_new")
LORA_MASKS = ("subspace", "factors")
CAPACITY_SINCE = 4  # first config format with the capacity options
LORA_MASK_SINCE = 5  # first config format with lora_mask; earlier ones masked the factors
# the paper's accumulation (Konishi et al. 2023): every task's importance kept whole, max over tasks
PAPER_CAPACITY = {"importance_sharpness": 1.0, "importance_budget": None, "importance_decay": 1.0}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_capacity(config: SoftMaskConfig) -> None:
    s, b, d = config.importance_sharpness, config.importance_budget, config.importance_decay
    if not _number(s) or not 1.0 <= s < float("inf"):
        raise ConfigError(f"importance_sharpness must be a finite number >= 1, got {s!r}")
    if b is not None and (not _number(b) or not 0.0 < b <= 1.0):
        raise ConfigError(f"importance_budget must be None or a number in (0, 1], got {b!r}")
    if not _number(d) or not 0.0 < d <= 1.0:
        raise ConfigError(f"importance_decay must be a number in (0, 1], got {d!r}")
    config.importance_sharpness = float(s)
    config.importance_budget = None if b is None else float(b)
    config.importance_decay = float(d)


def _modules_field(help_text: str) -> Any:
    return field(default=None, metadata={"help": help_text})


def _check_modules(name: str, value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        value = sorted(value)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise ConfigError(f"{name}={value!r} is not a valid regular expression: {e}") from e
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{name} must be a str (regex), a list of str or None, got {value!r}")


@dataclass
class SoftMaskConfig:
    """Configuration of a soft-masked model.

    Module selection uses PEFT's own matching rules (`peft.tuners.tuners_utils.
    check_target_module_exists`): a string is a full-match regex over module names, a list
    matches a module whose name equals an entry or ends with `"." + entry`.
    """

    method: str = field(
        default="spg", metadata={"help": "importance method: a name registered in METHODS"}
    )
    mask_mode: str = field(
        default="auto",
        metadata={
            "help": "'grad': grad *= 1 - A (the paper; exact under plain SGD); 'update': scale "
            "the optimizer's parameter change by 1 - A (protects under Adam-family optimizers "
            "and weight decay too); 'auto': grad for torch.optim.SGD, update for any other"
        },
    )
    target_modules: list[str] | str | None = _modules_field(
        "modules whose parameters are soft-masked; None = every parameter outside the heads"
    )
    exclude_modules: list[str] | str | None = _modules_field(
        "modules never masked (PEFT matching rules)"
    )
    head_modules: list[str] | str | None = _modules_field(
        "classifier heads: their gradients are scaled by one scalar 1 - mean(A); None = found "
        "automatically (MultiHeadClassifier heads)"
    )
    head_scaling: str = field(
        default="except_new",
        metadata={
            "help": "'all' (the official SPG code): every head's gradient is scaled by 1 - mean(A); "
            "'except_new': the current task's new head of a MultiHeadClassifier trains unscaled "
            "(a shared head is still scaled)"
        },
    )
    importance_dtype: str = field(
        default="float32", metadata={"help": f"dtype on disk, one of {IMPORTANCE_DTYPES}"}
    )
    importance_sharpness: float = field(
        default=2.0,
        metadata={
            "help": "capacity: each task's importance γ becomes γ**sharpness before it is "
            "accumulated (>= 1; 1 = the paper): values the task barely needed fall toward 0, "
            "the ones it needed most stay near 1"
        },
    )
    importance_budget: float | None = field(
        default=0.2,
        metadata={
            "help": "capacity: per task and tensor, only the largest `budget` share of the values "
            "keep their importance, the rest get 0 (in (0, 1]; None = the paper)"
        },
    )
    importance_decay: float = field(
        default=1.0,
        metadata={
            "help": "capacity: A^t = max(decay * A^(t-1), γ^t) (in (0, 1]; 1 = the paper's max): "
            "older tasks' protection fades unless a later task needs the same values"
        },
    )
    lora_mask: str = field(
        default="subspace",
        metadata={
            "help": "a LoRA PeftModel's protection: 'subspace' (lora_subspace.py: per adapted "
            "linear, A's SGD step soft-masked away from earlier tasks' input directions, the "
            "adapter folded into the base weights after each task; needs torch.optim.SGD) or "
            "'factors' (the method's element-wise importance of A and B, like any parameter). "
            "Ignored for other models"
        },
    )
    lora_subspace_scale: float = field(
        default=0.02,
        metadata={
            "help": "'subspace': a_k = tanh(λ_k / (scale · Σλ)) per input direction: a direction "
            "with the share `scale` of a layer's input energy is protected by 0.76, whatever "
            "the width; smaller protects more directions more strongly (> 0)"
        },
    )
    method_config: Any = field(
        default=None,
        metadata={"help": "the method's own options (SPGConfig, DASConfig); None = its defaults"},
    )

    def __post_init__(self) -> None:
        spec = method_spec(self.method)
        if self.mask_mode not in MASK_MODES:
            raise ConfigError(f"mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}")
        if self.head_scaling not in HEAD_SCALINGS:
            raise ConfigError(
                f"head_scaling must be one of {HEAD_SCALINGS}, got {self.head_scaling!r}"
            )
        if self.importance_dtype not in IMPORTANCE_DTYPES:
            raise ConfigError(
                f"importance_dtype must be one of {IMPORTANCE_DTYPES}, got {self.importance_dtype!r}"
            )
        _check_capacity(self)
        if self.lora_mask not in LORA_MASKS:
            raise ConfigError(f"lora_mask must be one of {LORA_MASKS}, got {self.lora_mask!r}")
        scale = self.lora_subspace_scale
        if not _number(scale) or not 0.0 < scale < float("inf"):
            raise ConfigError(f"lora_subspace_scale must be a finite number > 0, got {scale!r}")
        self.lora_subspace_scale = float(scale)
        for name in ("target_modules", "exclude_modules", "head_modules"):
            setattr(self, name, _check_modules(name, getattr(self, name)))
        options = self.method_config
        if options is None:
            options = spec.config_class()
        elif isinstance(options, dict):
            known = {f.name for f in fields(spec.config_class)}
            unknown = sorted(set(options) - known)
            if unknown:
                raise ConfigError(
                    f"unknown {spec.config_class.__name__} keys: {', '.join(unknown)} "
                    f"(known: {', '.join(sorted(known)) or 'none'})"
                )
            try:
                options = spec.config_class(**options)
            except TypeError as e:
                raise ConfigError(f"method_config for {self.method!r}: {e}") from e
        elif not isinstance(options, spec.config_class):
            raise ConfigError(
                f"method {self.method!r} takes a {spec.config_class.__name__} as method_config, "
                f"got {type(options).__name__}"
            )
        self.method_config = options

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, including the format version."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        out["method_config"] = asdict(self.method_config)
        return {"format_version": FORMAT_VERSION, **out}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SoftMaskConfig:
        """Build from `to_dict()` output (any readable format); unknown keys or versions raise."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a dict, got {type(data).__name__}")
        data = dict(data)
        if "format_version" not in data:
            raise UnsupportedFormatError(
                f"softmask config has no format_version (this release reads "
                f"{READABLE_FORMAT_VERSIONS}); was it written by softmask-peft?"
            )
        version = data.pop("format_version")
        if isinstance(version, bool) or version not in READABLE_FORMAT_VERSIONS:
            raise UnsupportedFormatError(
                f"softmask config format_version {version!r} is not supported "
                f"(this release reads {READABLE_FORMAT_VERSIONS})"
            )
        if version == 1:
            legacy = {new: data.pop(old) for old, new in _LEGACY_METHOD_KEYS.items() if old in data}
            for key in LEGACY_TASK_KEYS:
                data.pop(key, None)
            if data.get("method") == "das":
                data["method_config"] = {**legacy, "contrastive_positive": "grad"}  # as 0.1.0
            data["head_scaling"] = "all"  # what 0.1.0 did
        if version < CAPACITY_SINCE:  # written before the capacity options: the paper's rule
            data.update(PAPER_CAPACITY)
        if version < LORA_MASK_SINCE:  # LoRA was protected by the factors' importance
            data["lora_mask"] = "factors"
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown SoftMaskConfig keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return cls(**data)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `softmask_config.json` (indented, key-sorted) atomically."""
        path = ensure_directory(directory, SaveLocationError) / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> SoftMaskConfig:
        """Read `softmask_config.json` from `directory`."""
        return cls.from_dict(read_config_json(directory))


def read_config_json(directory: str | os.PathLike) -> dict[str, Any]:
    """The raw JSON object of `softmask_config.json`, size-checked before parsing."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise MissingFileError(f"no {CONFIG_NAME} in {str(directory)!r}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise CorruptFileError(f"{path} is {size} bytes; a softmask config is at most {MAX_CONFIG_BYTES}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptFileError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


__all__ = ["METHODS", "SoftMaskConfig", "read_config_json"]
