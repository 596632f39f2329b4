"""The artifacts manifest: what was exported, for which model, and which checkpoint is current.

`manifest.json` is the only file a save rewrites in place (atomically, last): it names the
current checkpoint and importance-history files by generation and carries their SHA-256 (and,
from format 3, the graphs' SHA-256 and the export id stamped into every graph), so a reader
sees either the old or the new generation, never a mix, and detects a damaged or foreign file
before onnxruntime parses it. Every field is type- and range-checked before anything is
allocated from it: shapes and the task count must fit in the bytes of the files they describe.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from softmask_format.atomic import atomic_write_text, recover_directory
from softmask_format.contract import (
    CONTRACT,
    FILES,
    LIMITS,
    MANIFEST_FIELDS,
    TENSORS,
    generation_file,
    manifest_problems,
)
from softmask_format.contract import PLAIN_NAME as _PLAIN_NAME
from softmask_format.names import DEVICE_FORMAT_VERSION as FORMAT_VERSION
from softmask_format.names import (
    EVAL_MODEL_NAME,
    EVAL_PROGRAM_NAME,
    IMPORTANCE_DTYPES,
    IMPORTANCE_MODEL_NAME,
    INFERENCE_PROGRAM_NAME,
    LOG_UINT8_SINCE,
    MANIFEST_NAME,
    OPTIMIZER_MODEL_NAME,
    TRAINING_DATA_NAME,
    TRAINING_MODEL_NAME,
    TRAINING_PROGRAM_NAME,
)
from softmask_format.names import READABLE_DEVICE_FORMAT_VERSIONS as READABLE_FORMATS

from .errors import (
    ArtifactMismatchError,
    CorruptArtifactError,
    MissingArtifactError,
    UnsupportedFormatError,
)
from .storage import NUMPY_DTYPES

STATIC_FILES = (TRAINING_MODEL_NAME, EVAL_MODEL_NAME, OPTIMIZER_MODEL_NAME, IMPORTANCE_MODEL_NAME)
EXECUTORCH_FILES = (
    TRAINING_PROGRAM_NAME,
    TRAINING_DATA_NAME,
    EVAL_PROGRAM_NAME,
    INFERENCE_PROGRAM_NAME,
)
# runtime -> the static files of its artifacts (a folder's runtime: the set its graphs_sha256 covers)
RUNTIME_FILES = {"onnxruntime": STATIC_FILES, "executorch": EXECUTORCH_FILES}
# names and limits of the device contract (softmask_format/device_contract.json)
IMPORTANCE_SUFFIX = TENSORS["importance_suffix"]
MEAN_IMPORTANCE = TENSORS["mean_importance"]  # ā, the heads' scale is 1 - ā
SCALE_INPUT = TENSORS["scale_input"]
CROSS_HEAD_INPUT = TENSORS["cross_head_input"]
TASK_INPUT = TENSORS["task_input"]
LABELS_INPUT = TENSORS["labels_input"]
LOGITS_OUTPUT = TENSORS["logits_output"]
LOSS_OUTPUT = TENSORS["loss_output"]
GRADIENT_SUFFIX = TENSORS["gradient_suffix"]  # training-graph output: P's accumulated gradient
LEARNING_RATE_INITIALIZER = TENSORS["learning_rate_initializer"]  # optimizer graph's lr (format 2)
EXPORT_ID_KEY = TENSORS["export_id_key"]  # graph metadata_props entry (format 3)
# format 4: graphs built after the exporter measured the forward shapes (softmask_edge.shapes);
# older ONNX Runtime artifacts with a wrong broadcast gradient are refused (session_graphs)
MEASURED_SHAPES_SINCE: int = CONTRACT["measured_shapes"]["since"]
BROADCAST_OPS = frozenset(CONTRACT["measured_shapes"]["broadcast_ops"])
GRADIENT_NAME_SUFFIX: str = CONTRACT["measured_shapes"]["gradient_name_suffix"]  # ORT: x -> x_grad
TASK_MODES = tuple(MANIFEST_FIELDS["task_mode"]["values"])
LOSSES = tuple(MANIFEST_FIELDS["loss"]["values"])
OPTIMIZERS = tuple(MANIFEST_FIELDS["optimizer"]["values"])
MAX_MANIFEST_BYTES = LIMITS["max_manifest_bytes"]  # a 10k-parameter model's manifest is ~1 MiB
MAX_RANK = LIMITS["max_rank"]
MAX_GENERATION = LIMITS["max_generation"]  # six digits in the file names
# ExecuTorch programs name a parameter P `model.net.P` (the modules that wrap the model);
# their inputs are the user inputs [+ task_id], labels, then, in `parameter_order`, one
# keep_P per trainable P (training: + the cross-head scalar before them) or the weights (eval)
PROGRAM_PARAMETER_PREFIX = "model.net."


def checkpoint_name(generation: int) -> str:
    return generation_file("checkpoint_prefix", generation)


def history_name(generation: int) -> str:
    return generation_file("history_prefix", generation, FILES["history_suffix"])


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def numel(shape: list[int]) -> int:
    """Element count of a validated shape (Python ints: no overflow)."""
    n = 1
    for d in shape:
        n *= d
    return n


def plain_name(name: str) -> str:
    """`name` if it is a plain file name (no separator, no `..`, not absolute, not hidden)."""
    if not _PLAIN_NAME.match(name) or name in (".", ".."):
        raise CorruptArtifactError(
            f"the manifest names {name!r}: only plain file names inside the artifacts folder"
        )
    return name


def regular_file(directory: Path, name: str) -> Path:
    """`directory / name` if `name` is a plain file name of a regular file there (no link)."""
    path = directory / plain_name(name)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        raise MissingArtifactError(f"{str(directory)!r} lacks {name}") from None
    except OSError as e:
        raise CorruptArtifactError(f"cannot stat {path}: {e.strerror}") from e
    if not stat.S_ISREG(mode):
        raise CorruptArtifactError(f"{path} is not a regular file (links are refused)")
    return path


@dataclass
class InputSpec:
    """One user input of the exported graph; `shape` holds None for dynamic dimensions."""

    name: str
    dtype: str
    shape: list[int | None]


def capacity_fields(capacity: Mapping[str, Any] | None) -> dict[str, Any]:
    """Manifest fields of the capacity options (`importance_update_model`'s keyword arguments:
    sharpness, budget, decay, cross_heads); None or a missing key: the paper's value."""
    c = dict(capacity or {})
    budget = c.get("budget")
    return {
        "importance_sharpness": float(c.get("sharpness", 1.0)),
        "importance_budget": 1.0 if budget is None else float(budget),
        "importance_decay": float(c.get("decay", 1.0)),
        "cross_heads": bool(c.get("cross_heads", True)),
    }


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
    # capacity options of the importance update (softmask_peft.capacity); absent: the paper's
    # rule. Optional fields like heads_scaled (format 3 unchanged); budget 1 keeps everything
    importance_sharpness: float = 1.0
    importance_budget: float = 1.0
    importance_decay: float = 1.0
    cross_heads: bool = True
    # format 3: a random id per export, stamped into every graph, and the graphs' SHA-256
    export_id: str = ""
    graphs_sha256: dict[str, str] = field(default_factory=dict)
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
        """Read and validate `manifest.json`; every named file must be a regular file there
        whose size can hold what the manifest says it holds."""
        directory = Path(directory)
        if not directory.is_dir():
            raise MissingArtifactError(f"artifacts directory {str(directory)!r} does not exist")
        try:
            recover_directory(directory)  # finish a committed export a kill interrupted
        except OSError as e:
            raise CorruptArtifactError(f"cannot recover {str(directory)!r}: {e}") from e
        path = directory / MANIFEST_NAME
        if not path.exists():
            raise MissingArtifactError(f"{str(directory)!r} has no {MANIFEST_NAME}")
        raw = _read_json(regular_file(directory, MANIFEST_NAME))
        version = raw.get("format_version")
        if type(version) is not int or version not in READABLE_FORMATS:
            raise UnsupportedFormatError(
                f"{path}: format_version {version!r} is not supported (this release reads "
                f"{', '.join(map(str, READABLE_FORMATS))})"
            )
        problems = _check_schema(raw)
        if problems:
            raise CorruptArtifactError(f"{path}: malformed manifest: " + "; ".join(problems[:10]))
        for name in (raw["checkpoint"], raw["history"], *raw.get("graphs_sha256", {})):
            plain_name(name)
        raw["inputs"] = [InputSpec(**spec) for spec in raw["inputs"]]
        manifest = cls(**raw)
        manifest._check_values(path)
        if manifest.importance_dtype == "uint8" and manifest.format_version < LOG_UINT8_SINCE:
            raise UnsupportedFormatError(
                f"{path}: format {manifest.format_version} stores uint8 importance on the old "
                f"linear code, which this release no longer decodes on the device: export the "
                "model again (its torch checkpoint still loads)"
            )
        sizes = {n: regular_file(directory, n).lstat().st_size for n in manifest.files()}
        manifest._check_sizes(path, sizes)
        return manifest

    @staticmethod
    def peek(directory: Path) -> dict[str, Any] | None:
        """The type-checked raw manifest of `directory` (None if it has none), without
        checking its files: what a writer needs to detect that the folder moved on."""
        if not (directory / MANIFEST_NAME).exists():
            return None
        raw = _read_json(regular_file(directory, MANIFEST_NAME))
        problems = _check_schema(raw)
        if problems:
            raise CorruptArtifactError(
                f"{directory / MANIFEST_NAME}: malformed manifest: " + "; ".join(problems[:10])
            )
        return raw

    @property
    def runtime(self) -> str:
        """"executorch" if the hashed static files are ExecuTorch programs, else "onnxruntime".

        Derived, not stored: an ONNX manifest is byte-for-byte what it was, and a reader that
        predates ExecuTorch refuses an ExecuTorch folder (its graphs_sha256 covers other files).
        """
        return "executorch" if sorted(self.graphs_sha256) == sorted(EXECUTORCH_FILES) else "onnxruntime"

    def static_files(self) -> tuple[str, ...]:
        """The graphs / programs of this export: never rewritten by a save."""
        return RUNTIME_FILES[self.runtime]

    def files(self) -> list[str]:
        """Every file the manifest names: graphs, checkpoint, history."""
        return [*self.static_files(), self.checkpoint, self.history]

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
        stored = {n + IMPORTANCE_SUFFIX for n in self.masked} | {MEAN_IMPORTANCE}
        unknown = sorted(set(self.masked + self.heads) - set(self.params))
        unknown += sorted(set(self.parameter_order) - set(self.params) - stored)
        if unknown:
            problems.append(f"names without a parameter: {unknown[:5]}")
        if len(set(self.masked)) != len(self.masked) or set(self.masked) & set(self.heads):
            problems.append("masked and heads must be distinct names")
        if self.format_version >= 2 and not (self.parameter_order and self.learning_rate > 0):
            problems.append("format >= 2 needs parameter_order and a positive learning_rate")
        hashed = sorted(self.graphs_sha256)
        if self.format_version >= 3 and len(self.export_id) != 32:
            problems.append("format 3 needs a 32-hex-digit export_id")
        if (self.format_version >= 3 or hashed) and hashed not in (
            sorted(files) for files in RUNTIME_FILES.values()
        ):
            problems.append(
                f"graphs_sha256 must cover exactly {list(STATIC_FILES)} (ONNX Runtime) or "
                f"{list(EXECUTORCH_FILES)} (ExecuTorch)"
            )
        if not self.head_classes:
            problems.append("head_classes is empty")
        declared = self.declared_tasks()
        if declared >= 0 and self.num_tasks > declared:
            problems.append(f"num_tasks {self.num_tasks} exceeds the {declared} declared heads")
        if len(self.task_names) > self.num_tasks + 1:
            problems.append(f"{len(self.task_names)} task_names for {self.num_tasks} task(s)")
        if (self.checkpoint, self.history) != (
            checkpoint_name(self.generation),
            history_name(self.generation),
        ):
            problems.append(
                f"generation {self.generation} must name {checkpoint_name(self.generation)} "
                f"and {history_name(self.generation)}"
            )
        if problems:
            raise CorruptArtifactError(f"{path}: " + "; ".join(problems))

    def _check_sizes(self, path: Path, sizes: dict[str, int]) -> None:
        """Shapes and the task count may only claim what the files' bytes can hold."""
        itemsize = np.dtype(NUMPY_DTYPES[self.importance_dtype]).itemsize
        weights = sum(numel(s) for s in self.params.values())
        masked = sum(numel(self.params[n]) for n in self.masked)
        if 4 * weights + itemsize * masked > sizes[self.checkpoint]:
            raise ArtifactMismatchError(
                f"{path}: the parameter shapes claim {4 * weights + itemsize * masked} bytes, "
                f"more than {self.checkpoint} holds ({sizes[self.checkpoint]})"
            )
        if self.num_tasks * itemsize * masked > sizes[self.history]:
            raise ArtifactMismatchError(
                f"{path}: {self.num_tasks} task(s) of importance need more bytes than "
                f"{self.history} holds ({sizes[self.history]})"
            )

    def verify_files(self, directory: str | os.PathLike) -> None:
        """Compare every named file with its recorded SHA-256, before anything parses it.

        Formats 1 and 2 record no graph hashes: there only checkpoint and history are checked.
        """
        directory = Path(directory)
        expected = {self.checkpoint: self.checkpoint_sha256, self.history: self.history_sha256}
        expected.update(self.graphs_sha256)
        for name, digest in expected.items():
            path = regular_file(directory, name)
            try:
                actual = sha256(path)
            except OSError as e:
                raise CorruptArtifactError(f"cannot read {path}: {e.strerror}") from e
            if actual == digest:
                continue
            foreign = graph_export_id(path) if name.endswith(".onnx") else None
            if foreign and foreign != self.export_id:
                raise ArtifactMismatchError(
                    f"{path} belongs to another export ({foreign}); the manifest is export "
                    f"{self.export_id}: copy the whole artifacts folder of one export"
                )
            raise CorruptArtifactError(
                f"{path} is damaged or belongs to another export: its SHA-256 differs from "
                "the manifest's"
            )


def graph_export_id(path: Path) -> str | None:
    """The export id stamped into an ONNX graph's metadata, None if unreadable or absent."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, OSError, ValueError):
        return None
    return next((p.value for p in model.metadata_props if p.key == EXPORT_ID_KEY), None)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object of at most MAX_MANIFEST_BYTES; nesting too deep is a corrupt file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise CorruptArtifactError(f"cannot read {path}: {e.strerror}") from e
    if len(data) > MAX_MANIFEST_BYTES:
        raise CorruptArtifactError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptArtifactError(f"cannot parse {path}: {type(e).__name__}: {e}") from e
    if not isinstance(raw, dict):
        raise CorruptArtifactError(f"{path}: expected a JSON object")
    return raw


def _check_schema(raw: dict[str, Any]) -> list[str]:
    """Type and range problems of the raw manifest fields (nothing is built from them yet)."""
    return manifest_problems(raw)


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
