"""The artifacts manifest: what was exported, for which model, and which checkpoint is current.

`manifest.json` is the only file a save rewrites in place (atomically, last): it names the
current checkpoint and importance-history files by generation and carries their SHA-256, so a
reader sees either the old or the new generation, never a mix, and detects a damaged file
before onnxruntime parses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from softmask_format.atomic import atomic_write_text
from softmask_format.names import DEVICE_FORMAT_VERSION as FORMAT_VERSION
from softmask_format.names import (
    EVAL_MODEL_NAME,
    IMPORTANCE_DTYPES,
    IMPORTANCE_MODEL_NAME,
    MANIFEST_NAME,
    OPTIMIZER_MODEL_NAME,
    TRAINING_MODEL_NAME,
)
from softmask_format.names import LOG_UINT8_SINCE
from softmask_format.names import READABLE_DEVICE_FORMAT_VERSIONS as READABLE_FORMATS

from .errors import CorruptArtifactError, MissingArtifactError, UnsupportedFormatError

STATIC_FILES = (TRAINING_MODEL_NAME, EVAL_MODEL_NAME, OPTIMIZER_MODEL_NAME, IMPORTANCE_MODEL_NAME)
IMPORTANCE_SUFFIX = ".softmask_importance"
MEAN_IMPORTANCE = "softmask.mean_importance"  # ā, the heads' scale is 1 - ā
SCALE_INPUT = "softmask_scale"
CROSS_HEAD_INPUT = "softmask_cross_head"
TASK_INPUT = "task_id"
LABELS_INPUT = "labels"
LOGITS_OUTPUT = "logits"
LOSS_OUTPUT = "loss"
GRADIENT_SUFFIX = ".softmask_gradient"  # training-graph output: P's accumulated gradient
LEARNING_RATE_INITIALIZER = "softmask.learning_rate"  # optimizer graph's lr (format 2)
TASK_MODES = ("task_incremental", "shared_head")
LOSSES = ("cross_entropy",)
OPTIMIZERS = ("sgd", "adamw")


def checkpoint_name(generation: int) -> str:
    return f"checkpoint-{generation:06d}"


def history_name(generation: int) -> str:
    return f"importance_history-{generation:06d}.npz"


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class InputSpec:
    """One user input of the exported graph; `shape` holds None for dynamic dimensions."""

    name: str
    dtype: str
    shape: list[int | None]


@dataclass
class Manifest:
    """Everything a loader needs to check artifacts against a model and a batch."""

    task_mode: str
    inputs: list[InputSpec]
    params: dict[str, list[int]]
    masked: list[str]
    heads: list[str]
    head_classes: list[int]
    num_classes: int
    importance_dtype: str
    loss: str
    optimizer: str
    num_tasks: int
    versions: dict[str, str]
    generation: int = 0
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    history: str = ""
    history_sha256: str = ""
    task_names: list[str] = field(default_factory=list)
    # checkpoint parameters in the training graph's input order = the order of ORT's flat
    # parameter buffer (getContiguousParameters); empty in format 1
    parameter_order: list[str] = field(default_factory=list)
    learning_rate: float = 0.0  # the lr recorded in the optimizer graph (format 2)
    heads_scaled: bool = True  # False: head gradients train unscaled (head_scaling="except_new")
    format_version: int = FORMAT_VERSION

    def declared_tasks(self) -> int:
        """Tasks the graph can learn in total: one per declared head; -1 (no limit) for a shared head."""
        return len(self.head_classes) if self.task_mode == "task_incremental" else -1

    def task_classes(self, task_id: int) -> int:
        """Classes of the head task `task_id` trains (the shared head for every task)."""
        if self.task_mode == "shared_head":
            return self.head_classes[0]
        return self.head_classes[task_id]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def save(self, directory: str | os.PathLike) -> None:
        atomic_write_text(Path(directory) / MANIFEST_NAME, self.to_json())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest:
        """Read and validate `manifest.json`; every referenced file must exist."""
        directory = Path(directory)
        if not directory.is_dir():
            raise MissingArtifactError(f"artifacts directory {str(directory)!r} does not exist")
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise MissingArtifactError(f"{str(directory)!r} has no {MANIFEST_NAME}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptArtifactError(f"cannot parse {path}: {e}") from e
        if not isinstance(raw, dict):
            raise CorruptArtifactError(f"{path}: expected a JSON object")
        version = raw.get("format_version")
        if version not in READABLE_FORMATS:
            raise UnsupportedFormatError(
                f"{path}: format_version {version!r} is not supported (this release reads "
                f"{', '.join(map(str, READABLE_FORMATS))})"
            )
        try:
            raw["inputs"] = [InputSpec(**spec) for spec in raw["inputs"]]
            manifest = cls(**raw)
        except (KeyError, TypeError) as e:
            raise CorruptArtifactError(f"{path}: malformed manifest ({e})") from e
        manifest._check_values(path)
        if manifest.importance_dtype == "uint8" and manifest.format_version < LOG_UINT8_SINCE:
            raise UnsupportedFormatError(
                f"{path}: format {manifest.format_version} stores uint8 importance on the old "
                f"linear code, which this release no longer decodes on the device: export the "
                "model again (its torch checkpoint still loads)"
            )
        missing = [
            n
            for n in (*STATIC_FILES, manifest.checkpoint, manifest.history)
            if not (directory / n).is_file()
        ]
        if missing:
            raise MissingArtifactError(f"{str(directory)!r} lacks {', '.join(missing)}")
        return manifest

    def _check_values(self, path: Path) -> None:
        problems = []
        for name, value, allowed in (
            ("task_mode", self.task_mode, TASK_MODES),
            ("loss", self.loss, LOSSES),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("importance_dtype", self.importance_dtype, IMPORTANCE_DTYPES),
        ):
            if value not in allowed:
                problems.append(f"{name} {value!r} not in {allowed}")
        unknown = sorted(set(self.masked + self.heads) - set(self.params))
        if unknown:
            problems.append(f"masked/head names without a parameter: {unknown}")
        if self.format_version >= 2 and not (self.parameter_order and self.learning_rate > 0):
            problems.append("format >= 2 needs parameter_order and a positive learning_rate")
        if not self.checkpoint or not self.history:
            problems.append("no checkpoint recorded")
        if problems:
            raise CorruptArtifactError(f"{path}: " + "; ".join(problems))

    def verify_files(self, directory: str | os.PathLike) -> None:
        """Compare the checkpoint and history files with their recorded SHA-256."""
        for name, expected in (
            (self.checkpoint, self.checkpoint_sha256),
            (self.history, self.history_sha256),
        ):
            if sha256(Path(directory) / name) != expected:
                raise CorruptArtifactError(
                    f"{Path(directory) / name} is damaged: its SHA-256 differs from the manifest"
                )


def package_versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Versions of the packages the artifacts were built with (recorded in the manifest)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for dist in (
        "onnxruntime-training-cpu",
        "onnxruntime-training",
        "onnxruntime",
        "onnx",
        "numpy",
    ):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    out.update(extra or {})
    return out
