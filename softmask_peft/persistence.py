"""save_pretrained / from_pretrained mechanics: the files, their validation, the commit.

A save writes, as one commit (`softmask_format.atomic.commit_files`): `softmask_config.json`, the importance
file and the base model's weights. Importance file (format 3):

    tensors   {name}: accumulated A     task.{k}.{name}: task k's importance
              general.{name}: DAS's general importance (when computed)
    metadata  format, softmask_version, format_version, num_tasks, tasks (JSON task log),
              dtype, save_id, config (the config's JSON, since 0.3)

Format 1 (0.1.0) kept the task log in the config and had no general importance; formats 1
and 2 stored uint8 importance as round(255 · A), format 3 as the log-keep code
(`softmask_format.codec`); the format version in the metadata picks the decoder, so all load.
Everything is validated before anything is built: a file only makes us allocate what its own
bytes justify (every header is checked against the model before its data is read, head sizes
against the weights file's header). Each file is read once (`weights.open_safetensors`) and the
pairing is checked on the bytes read: weights and importance carry the same `save_id`, and the
importance metadata records the config it was saved with (`config`, since 0.3: a config edited
afterwards so that it masks other parameters is refused). The save id is provenance of a file,
so it lives here, never in the store: `read_importance` returns it beside the store.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from softmask_format import codec
from softmask_format.atomic import atomic_write, commit_files, ensure_directory, recover_directory
from softmask_format.keys import GENERAL_PREFIX, TASK_PREFIX, task_key
from softmask_format.names import (
    CONFIG_NAME,
    FORMAT_VERSION,
    IMPORTANCE_DTYPES,
    IMPORTANCE_NAME,
    LOG_UINT8_SINCE,
    LORA_SUBSPACE_NAME,
    READABLE_FORMAT_VERSIONS,
)
from softmask_format.version import package_version
from torch import Tensor, nn

from .config import LEGACY_TASK_KEYS, SoftMaskConfig, read_config_json
from .errors import (
    ConfigError,
    CorruptFileError,
    ImportanceMismatchError,
    MissingFileError,
    SaveLocationError,
    SoftMaskError,
    TargetModulesError,
    UnsupportedFormatError,
)
from .heads import MultiHeadClassifier
from .importance import method_spec
from .lora_subspace import LoRASubspace, elementwise_masked, subspace_for
from .selection import select_parameters
from .store import ImportanceStore, TaskRecord
from .weights import (
    Header,
    SafetensorsFile,
    SavedWeights,
    open_safetensors,
    read_weights,
    save_weights,
)

PAIRING_ATTEMPTS = 3  # reads of a folder whose files a concurrent save is replacing
PAIRING_RETRY_SECONDS = 0.05
MAX_TASKS = 100_000
MAX_CLASSES = 1_000_000


def encode(a: Tensor, dtype: str) -> Tensor:
    """Importance in [0, 1] -> storage dtype, by `softmask_format.codec` (uint8: log-keep code)."""
    return torch.from_numpy(codec.encode(a.detach().to("cpu", torch.float32).numpy(), dtype))


def decode(a: Tensor, format_version: int = FORMAT_VERSION) -> Tensor:
    """Storage dtype -> float32 importance, by `softmask_format.codec`.

    uint8 is the log-keep code from format 3 on, c / 255 in files of format 1-2.
    """
    linear = format_version < LOG_UINT8_SINCE
    return torch.from_numpy(codec.decode(a.numpy(), linear_uint8=linear))


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}


# saving -----------------------------------------------------------------------------------------


def importance_tensors(store: ImportanceStore, dtype: str) -> dict[str, Tensor]:
    """Flat `{name: A, task.{k}.{name}: γ^k, general.{name}: G}` dict in the storage dtype."""
    if dtype not in IMPORTANCE_DTYPES:
        raise ConfigError(f"dtype must be one of {IMPORTANCE_DTYPES}, got {dtype!r}")
    out = {name: encode(v, dtype) for name, v in store.accumulated.items()}
    for k, task in enumerate(store.history):
        out.update({task_key(k, name): encode(v, dtype) for name, v in task.items()})
    for name, v in (store.general or {}).items():
        out[f"{GENERAL_PREFIX}{name}"] = encode(v, dtype)
    return out


def save_importance(
    path: Path, store: ImportanceStore, dtype: str, save_id: str = "", config: str = ""
) -> None:
    """Write the store as safetensors atomically; `save_id` ties it to the weights saved with it,
    `config` (the config's JSON) to the selection it was computed under."""
    tasks = [{"name": t.name, "num_classes": t.num_classes} for t in store.tasks]
    metadata = {
        "format": "pt",
        "softmask_version": package_version(),
        "format_version": str(FORMAT_VERSION),
        "num_tasks": str(store.num_tasks),
        "tasks": json.dumps(tasks),
        "dtype": dtype,
        "save_id": save_id,
        "config": config,
    }
    tensors = importance_tensors(store, dtype)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_checkpoint(
    directory: str | os.PathLike,
    base_model: nn.Module,
    config: SoftMaskConfig,
    store: ImportanceStore,
    subspace: Mapping[str, Tensor] | None = None,
) -> None:
    """Write config, importance and the base weights into `directory`, as one commit; with a
    LoRA subspace mask also its state (`LORA_SUBSPACE_NAME`: covariances and folded weights).

    The files are staged and committed as a set: a crash leaves the previous checkpoint or,
    once committed, the new one, which the next load finishes moving into place. Weights,
    importance (and subspace state) carry the same random `save_id`, so files from two saves
    are refused.
    """
    save_id = uuid.uuid4().hex

    def write(staging: Path) -> None:
        save_weights(base_model, staging, save_id)
        if subspace is not None:
            meta = {"format_version": str(FORMAT_VERSION), "save_id": save_id}
            save_file(dict(subspace), str(staging / LORA_SUBSPACE_NAME), metadata=meta)
        recorded = json.dumps(config.to_dict(), sort_keys=True)
        save_importance(staging / IMPORTANCE_NAME, store, config.importance_dtype, save_id, recorded)
        config.save_pretrained(staging)

    created = _first_missing(Path(directory))
    try:
        commit_files(ensure_directory(directory, SaveLocationError), write)
    except SoftMaskError:
        _remove_if_created_empty(directory, created)
        raise
    except (OSError, ValueError, SafetensorError) as e:  # full disk, read-only, bad path
        _remove_if_created_empty(directory, created)
        raise SaveLocationError(
            f"cannot save into {str(directory)!r}: {e}; nothing was changed there"
        ) from e


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (None: `path` exists)."""
    missing = None
    while not path.exists() and path != path.parent:
        missing, path = path, path.parent
    return missing


def _remove_if_created_empty(directory: str | os.PathLike, created: Path | None) -> None:
    """A refused save leaves no trace: drop the folders it created, while they are empty."""
    path = Path(directory)
    while created is not None and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        if path == created:
            break
        path = path.parent


# loading ----------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """Everything `from_pretrained` needs, read once and validated: the model applies it
    (`weights` with `weights.load_weights` once its heads exist)."""

    config: SoftMaskConfig
    store: ImportanceStore
    weights: SavedWeights
    subspace: dict[str, Tensor] | None = None  # LoRA subspace state, checked against the model


@dataclass
class ImportanceFile:
    """An importance file as read: the store, and the file's provenance (the save id that
    pairs it with the weights, the config JSON it was saved with; "" in older files)."""

    store: ImportanceStore
    save_id: str
    config: str


def _parse_tasks(raw: Any, where: str) -> list[TaskRecord]:
    """A task log from JSON: a list of {"name": str, "num_classes": int | None}."""
    if not isinstance(raw, list) or len(raw) > MAX_TASKS:
        raise CorruptFileError(f"{where}: the task log must be a list of at most {MAX_TASKS} tasks")
    out = []
    for k, item in enumerate(raw):
        name, classes = (item.get("name"), item.get("num_classes")) if isinstance(item, dict) else (None, None)
        ok_classes = classes is None or (
            isinstance(classes, int) and not isinstance(classes, bool) and 1 <= classes <= MAX_CLASSES
        )
        if not isinstance(name, str) or not ok_classes:
            raise CorruptFileError(
                f"{where}: task {k} must have a str name and num_classes in 1..{MAX_CLASSES} or "
                f"null, got {item!r}"
            )
        out.append(TaskRecord(name, classes))
    return out


def _legacy_tasks(data: Mapping[str, Any], where: str) -> list[TaskRecord]:
    """Format 1's task log: `task_names` and `task_num_classes` in the config."""
    names, classes = (data.get(k, []) for k in LEGACY_TASK_KEYS)
    if not isinstance(names, list) or not isinstance(classes, list) or (
        classes and len(classes) != len(names)
    ):
        raise CorruptFileError(f"{where}: task_names / task_num_classes are malformed")
    classes = classes or [None] * len(names)
    return _parse_tasks([{"name": n, "num_classes": c} for n, c in zip(names, classes)], where)


def head_shapes(base_model: nn.Module, tasks: list[TaskRecord]) -> dict[str, tuple[int, ...]]:
    """Shapes of the heads (and task adapters) a `MultiHeadClassifier` lacks for `tasks`
    (none for other models)."""
    if not isinstance(base_model, MultiHeadClassifier):
        return {}
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(len(base_model.heads), len(tasks)):
        n = tasks[k].num_classes
        if n is None:
            raise CorruptFileError(f"the task log lacks the class count of head {k}")
        shapes |= base_model.task_parameter_shapes(k, n)
    return shapes


def _version(metadata: Mapping[str, str], where: str) -> int:
    """The importance file's format version, from its metadata; unknown versions raise."""
    text = metadata.get("format_version")
    if text not in [str(v) for v in READABLE_FORMAT_VERSIONS]:
        raise UnsupportedFormatError(
            f"{where}: importance format_version {text!r} is not supported "
            f"(this release reads {READABLE_FORMAT_VERSIONS})"
        )
    return int(text)


def _task_log(metadata: Mapping[str, str], version: int, raw_config: Mapping[str, Any], where: str) -> list[TaskRecord]:
    """The task log: the importance file's metadata (format 2+) or the config (format 1)."""
    if version == 1:
        return _legacy_tasks(raw_config, CONFIG_NAME)
    try:
        raw = json.loads(metadata.get("tasks", "[]"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise CorruptFileError(f"{where}: metadata tasks is not JSON: {e}") from e
    return _parse_tasks(raw, where)


def importance_problem(value: Any, shape: tuple[int, ...] | torch.Size | None) -> str | None:
    """What is wrong with a decoded importance tensor for a slot of `shape` (None: fine)."""
    if shape is None:
        return "no such parameter or unit in this model"
    if not isinstance(value, Tensor):
        return "missing" if value is None else f"a {type(value).__name__}, not a tensor"
    if tuple(value.shape) != tuple(shape):
        return f"shape {tuple(value.shape)} != expected {tuple(shape)}"
    if value.dtype != torch.float32:
        return f"dtype {value.dtype}, not float32"
    if value.numel() and not (
        bool(torch.isfinite(value).all()) and float(value.min()) >= 0 and float(value.max()) <= 1
    ):
        return "values outside [0, 1]"
    return None


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "uint8": "U8"}


@dataclass
class _Plan:
    """What an importance file's header says, checked against the model: where each key goes."""

    version: int
    tasks: list[TaskRecord]
    num_tasks: int
    groups: dict[str, dict[str, str]]  # prefix -> {name: key}


def _plan_importance(
    head: Header,
    where: str,
    allowed: Mapping[str, torch.Size],
    tasks: list[TaskRecord] | None,
    required: set[str],
    raw_config: Mapping[str, Any],
    empty_tasks: bool = False,
) -> _Plan:
    """Check everything an importance header tells (version, task log, keys, shapes, dtypes)
    against the model; raise before any tensor data is read. `empty_tasks`: a task may hold no
    importance (a LoRA model whose trainable tensors a subspace mask protects)."""
    metadata = head.metadata
    version = _version(metadata, where)
    if tasks is None:
        tasks = _task_log(metadata, version, raw_config, where)
    try:
        num_tasks = int(metadata.get("num_tasks", ""))
    except ValueError as e:
        raise CorruptFileError(f"{where}: metadata num_tasks is missing or invalid") from e
    if num_tasks < 0 or (not empty_tasks and num_tasks > len(head.shapes)):
        raise CorruptFileError(
            f"{where}: metadata says {num_tasks} task(s) but the file holds {len(head.shapes)} "
            "tensor(s)"
        )
    dtype = metadata.get("dtype", "float32")
    if dtype not in IMPORTANCE_DTYPES:
        raise CorruptFileError(f"{where}: metadata dtype {dtype!r} is not one of {IMPORTANCE_DTYPES}")
    groups: dict[str, dict[str, str]] = {"": {}, GENERAL_PREFIX: {}}
    groups.update({f"{TASK_PREFIX}{k}.": {} for k in range(num_tasks)})
    problems = []
    for key in sorted(head.shapes):
        prefix = next(
            (p for p in groups if p and key.startswith(p) and key[len(p) :] in allowed), ""
        )
        name = key[len(prefix) :]
        if name not in allowed or (prefix == GENERAL_PREFIX and version < 2):
            problems.append(f"unexpected key {key!r}")
        elif head.dtypes[key] != _SAFETENSORS_DTYPES[dtype]:
            problems.append(f"{key}: dtype {head.dtypes[key]} but the file's metadata says {dtype}")
        else:
            if head.shapes[key] != tuple(allowed[name]):
                problems.append(f"{key}: shape {head.shapes[key]} != expected {tuple(allowed[name])}")
            groups[prefix][name] = key
    accumulated, general = groups[""], groups[GENERAL_PREFIX]
    covered = {n for p, task in groups.items() if p.startswith(TASK_PREFIX) for n in task}
    # a store saved before its first task ends has no accumulated importance yet
    if num_tasks or accumulated:
        problems += [f"missing key {n!r}" for n in sorted((required | covered) - set(accumulated))]
    if general:
        problems += [f"missing key {GENERAL_PREFIX + n!r}" for n in sorted(required - set(general))]
    if not empty_tasks:
        problems += [
            f"task {k} has no importance" for k in range(num_tasks) if not groups[f"{TASK_PREFIX}{k}."]
        ]
    if not num_tasks <= len(tasks) <= num_tasks + 1:
        problems.append(f"the task log names {len(tasks)} task(s) but the file holds {num_tasks}")
    _raise_problems(problems, where)
    return _Plan(version, tasks, num_tasks, groups)


def _raise_problems(problems: list[str], where: str) -> None:
    if problems:
        shown = problems[:20] + ([f"(+{len(problems) - 20} more)"] if len(problems) > 20 else [])
        raise ImportanceMismatchError(f"cannot load importance from {where}:\n  " + "\n  ".join(shown))


def read_importance(
    source: Path | SafetensorsFile,
    allowed: Mapping[str, torch.Size],
    tasks: list[TaskRecord] | None = None,
    required: Collection[str] | None = None,
    raw_config: Mapping[str, Any] | None = None,
    empty_tasks: bool = False,
) -> ImportanceFile:
    """Read and validate an importance file once; raise before building anything if it does
    not fit.

    `allowed` maps every name the file may hold to its shape (SPG: every parameter of the
    model, since the masked set may change between tasks; DAS: the units). `required` names
    must be in the accumulated (and general) importance; default: all of `allowed`. Each task
    covers at least one name (a task that trained only its own PEFT adapter covers a subset),
    and the accumulated importance covers every name a task does. Every problem (missing or
    unexpected key, shape, dtype other than the metadata's, value outside [0, 1]) is listed in
    one error; all but the values are found in the header, before any tensor data is read.
    `tasks` defaults to the file's own task log (format 2+; format 1: `raw_config`'s).
    `source`: a path, or a file the caller opened (`weights.open_safetensors`) and has read
    the header of. `empty_tasks`: tasks may hold no importance at all (a LoRA subspace mask).
    """
    if not isinstance(source, SafetensorsFile):
        path = Path(source)
        if not path.is_file():
            raise MissingFileError(f"importance file {str(path)!r} does not exist")
        with open_safetensors(path) as f:
            return read_importance(f, allowed, tasks, required, raw_config, empty_tasks)
    where = repr(str(source.path))
    required = set(allowed if required is None else required)
    head = source.header
    plan = _plan_importance(head, where, allowed, tasks, required, raw_config or {}, empty_tasks)
    tensors = source.tensors()
    decoded = {
        prefix: {n: decode(tensors[key], plan.version) for n, key in group.items()}
        for prefix, group in plan.groups.items()
    }
    _raise_problems(
        [
            f"{prefix + n}: {problem}"
            for prefix, group in decoded.items()
            for n, v in group.items()
            if (problem := importance_problem(v, allowed[n]))
        ],
        where,
    )
    store = ImportanceStore.from_parts(
        [decoded[f"{TASK_PREFIX}{k}."] for k in range(plan.num_tasks)],
        plan.tasks,
        accumulated=decoded[""],
        general=decoded[GENERAL_PREFIX] or None,
    )
    return ImportanceFile(store, head.metadata.get("save_id", ""), head.metadata.get("config", ""))


def load_importance(
    path: Path,
    allowed: Mapping[str, torch.Size],
    tasks: list[TaskRecord] | None = None,
    required: Collection[str] | None = None,
) -> ImportanceStore:
    """The store of `read_importance` (for callers that need no provenance)."""
    return read_importance(path, allowed, tasks, required).store


def _check_selection(
    base_model: nn.Module, config: SoftMaskConfig, recorded: str, where: str
) -> None:
    """Refuse a config edited after saving so that it masks other parameters (a parameter
    with importance turned into a head, say): the importance would be kept but ignored, or
    applied where it was never measured. Edits that keep the selection (mask_mode, ...) load."""
    if not recorded:
        return  # saved before 0.3: no record to compare with
    try:
        saved = SoftMaskConfig.from_dict(json.loads(recorded))
    except (SoftMaskError, ValueError, TypeError, RecursionError) as e:
        raise CorruptFileError(f"{where}: the recorded config is malformed: {e}") from e
    if saved == config:
        return
    now = select_parameters(base_model, config)
    try:
        then = select_parameters(base_model, saved)
    except TargetModulesError:
        then = ([], [])
    if now == then:
        return
    lost = sorted(set(then[0]) - set(now[0]))
    gained = sorted(set(now[0]) - set(then[0]))
    fields = ("target_modules", "exclude_modules", "head_modules")
    raise ConfigError(
        f"{CONFIG_NAME} in {where} selects other parameters than the config the importance was "
        "saved with (edited after saving?): "
        + "; ".join(
            part
            for part in (
                lost and f"masked when saved, not now: {lost[:5]}" + (" ..." if len(lost) > 5 else ""),
                gained and f"masked now, not when saved: {gained[:5]}" + (" ..." if len(gained) > 5 else ""),
                then[1] != now[1] and f"heads then {then[1][:5]}, now {now[1][:5]}",
            )
            if part
        )
        + ". Restore "
        + ", ".join(f"{f}={getattr(saved, f)!r}" for f in fields)
    )


def load_checkpoint(base_model: nn.Module, directory: str | os.PathLike) -> Checkpoint:
    """Read and validate what `save_checkpoint` wrote, for loading onto `base_model`.

    Each file is read once; if the weights and the importance read come from two saves (a
    save landed between the two reads), the folder is read again, up to `PAIRING_ATTEMPTS`
    times. Nothing in `base_model` changes here; every check passes before the caller applies it
    (files present, config and format version known, task log sane, weights and importance
    keys, shapes, dtypes and range).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingFileError(f"{str(directory)!r} is not a directory")
    try:
        recover_directory(directory)
    except OSError as e:
        raise SaveLocationError(
            f"{str(directory)!r} holds a committed but unfinished save that cannot be "
            f"completed: {e}"
        ) from e
    missing = [n for n in (CONFIG_NAME, IMPORTANCE_NAME) if not (directory / n).is_file()]
    if missing:
        raise MissingFileError(f"{str(directory)!r} lacks {', '.join(missing)}")
    for attempt in range(PAIRING_ATTEMPTS):
        try:
            return _read_checkpoint(base_model, directory)
        except _MixedSaveError as e:
            if attempt == PAIRING_ATTEMPTS - 1:
                raise CorruptFileError(str(e)) from None
            time.sleep(PAIRING_RETRY_SECONDS)  # a save is landing: its rename order is brief
    raise AssertionError("unreachable")


class _MixedSaveError(CorruptFileError):
    """Weights and importance of two different saves: a save is landing (retried) or one
    was interrupted."""


def _read_checkpoint(base_model: nn.Module, directory: Path) -> Checkpoint:
    raw_config = read_config_json(directory)  # one read each: config, importance, weights
    config = SoftMaskConfig.from_dict(raw_config)
    where = repr(str(directory))
    with open_safetensors(directory / IMPORTANCE_NAME) as importance:
        metadata = importance.header.metadata
        tasks = _task_log(metadata, _version(metadata, IMPORTANCE_NAME), raw_config, IMPORTANCE_NAME)
        weights = read_weights(base_model, directory, head_shapes(base_model, tasks))
        if weights.save_id != metadata.get("save_id", ""):
            raise _MixedSaveError(
                f"the weights and {IMPORTANCE_NAME} in {where} come from different saves (a "
                "save in progress, or an interrupted one?); refusing to pair them"
            )
        masked, _ = select_parameters(base_model, config)
        lora = subspace_for(base_model, config)
        masked = elementwise_masked(masked, lora)
        method = method_spec(config.method).method_class(base_model, masked, config.method_config)
        saved = read_importance(
            importance,
            method.storable_shapes(),
            tasks,
            method.required_importance(),
            empty_tasks=lora is not None,
        )
        subspace = None if lora is None else _read_subspace(directory, lora, weights.save_id)
    _check_selection(base_model, config, saved.config, where)
    return Checkpoint(config, saved.store, weights, subspace)


def _read_subspace(directory: Path, lora: LoRASubspace, save_id: str) -> dict[str, Tensor]:
    """The LoRA subspace state saved with the weights `save_id` names, checked against the
    model (header before any tensor data, then values)."""
    path = directory / LORA_SUBSPACE_NAME
    expected = lora.shapes()
    with open_safetensors(path) as f:
        meta = f.header.metadata
        if meta.get("save_id", "") != save_id:
            raise _MixedSaveError(
                f"the weights and {LORA_SUBSPACE_NAME} in {str(directory)!r} come from "
                "different saves; refusing to pair them"
            )
        wrong = [
            k for k in sorted(set(expected) | set(f.header.shapes))
            if f.header.shapes.get(k) != expected.get(k) or f.header.dtypes.get(k) != "F32"
        ]  # fmt: skip
        if wrong:
            raise ImportanceMismatchError(
                f"{str(path)!r} does not fit this model's LoRA layers: {', '.join(wrong[:5])} "
                "(missing, unexpected, or not float32 of the layer's shape)"
            )
        state = f.tensors()
    problems = lora.problems(state)
    if problems:
        raise ImportanceMismatchError(f"{str(path)!r}:\n  " + "\n  ".join(problems[:10]))
    return state
