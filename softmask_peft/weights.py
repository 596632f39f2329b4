"""How a base model's own weights are written beside the softmask files, and read back.

Three layouts, each the one the base library itself opens:

* a `PeftModel`: PEFT's adapter files, written by `PeftModel.save_pretrained` — per adapter
  `adapter_config.json` + `adapter_model.safetensors` (the adapter named "default" at the top
  level, any other in a sub-folder named after it). Only adapter weights and `modules_to_save`
  are written, never the frozen backbone; `PeftModel.from_pretrained(base, dir,
  is_trainable=True)` reads them.
* a transformers `PreTrainedModel`: its `config.json` and every weight in `model.safetensors`
  (soft-masked training changes the base weights), so `AutoModel....from_pretrained(dir)` opens it.
* any other `nn.Module`: `model.safetensors` (`safetensors.torch.save_model`).

Every weight file carries the save's random `save_id` in its metadata, so weights and
importance from two different saves are never paired. Every file is read once
(`read_safetensors`): its header is parsed and validated against the model before a byte of
tensor data is read, and the save id is taken from those same bytes, so a save landing while
a reader works can give the reader the old file or the new one, never a mix of both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file, save_model
from softmask_format.names import WEIGHTS_NAME
from torch import Tensor, nn

from .errors import (
    ConfigError,
    CorruptFileError,
    MissingFileError,
    SoftMaskError,
    WeightsMismatchError,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
# bytes per element of every safetensors dtype
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip

# what a file holds, once read: tensors and metadata, plus the weights per PEFT adapter
Weights = dict[str, Tensor]


def _is_peft(model: nn.Module) -> bool:
    from peft import PeftModel  # peft is slow to import: only when weights are read or written

    return isinstance(model, PeftModel)


def _adapter_dir(directory: Path, adapter: str) -> Path:
    """PEFT's layout: "default" at the top, other adapters in a sub-folder of their name."""
    return directory if adapter == "default" else directory / adapter


def check_adapter_names(names: list[str]) -> None:
    """Refuse adapter names that are not one plain folder name: PEFT joins them to the save
    folder, so an absolute name or one with separators writes (and reads) outside it."""
    bad = [
        n
        for n in names
        if not isinstance(n, str)
        or not n
        or n.startswith(".")
        or "/" in n
        or "\\" in n
        or (os.altsep and os.altsep in n)
        or os.path.isabs(n)
        or Path(n).name != n
    ]
    if bad:
        raise ConfigError(
            f"adapter name(s) {bad!r} are not plain folder names: PEFT stores an adapter in a "
            "sub-folder of the save folder named after it, so a name must not be absolute, "
            "contain a path separator or start with '.'; rename the adapter"
        )


def _check_not_merged(model: nn.Module) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ConfigError(
            "this PeftModel has no adapter layers left (was merge_and_unload() called?): its "
            "importance refers to adapter weights that no longer exist. Save the PeftModel before "
            "merging, or wrap the merged model in a new SoftMaskModel"
        )


def save_weights(model: nn.Module, staging: Path, save_id: str) -> None:
    """Write `model`'s weights into `staging` in the layout its own library reads."""
    metadata = {"format": "pt", "save_id": save_id, "model_class": type(model).__name__}
    if _is_peft(model):
        _check_not_merged(model)
        check_adapter_names(list(model.peft_config))
        model.save_pretrained(str(staging))
        for adapter in model.peft_config:
            path = _adapter_dir(staging, adapter) / ADAPTER_WEIGHTS
            save_file(load_file(path), str(path), metadata=metadata)  # PEFT's tensors, our id
        return
    config = getattr(model, "config", None)
    if hasattr(model, "save_pretrained") and hasattr(config, "save_pretrained"):
        config.save_pretrained(staging)
    # force_contiguous: a transposed or sliced parameter is saved as its values (safetensors
    # refuses non-contiguous tensors otherwise)
    save_model(model, str(staging / WEIGHTS_NAME), metadata, force_contiguous=True)


@dataclass(frozen=True)
class Header:
    """A safetensors header: per tensor its dtype (safetensors' code) and shape; the metadata."""

    dtypes: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]


def _parse_header(raw: bytes, data_bytes: int, path: Path) -> Header:
    """The header's JSON, checked as safetensors lays it out: every tensor a known dtype, a
    shape of non-negative ints and a byte range of exactly numel · itemsize, the ranges tiling
    the data that follows without gap or overlap."""
    try:
        head = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptFileError(f"cannot read {str(path)!r}: the header is not JSON ({e})") from e
    if not isinstance(head, dict):
        raise CorruptFileError(f"cannot read {str(path)!r}: the header is not a JSON object")
    metadata = head.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptFileError(f"cannot read {str(path)!r}: the metadata is not a str -> str map")
    dtypes, shapes, spans = {}, {}, []
    for name, info in head.items():
        ok = isinstance(info, dict) and info.get("dtype") in DTYPE_BYTES
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
        ok = ok and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape + offsets)
        numel = 1
        for d in shape if ok else []:
            numel *= d
        if not ok or offsets[1] - offsets[0] != numel * DTYPE_BYTES[info["dtype"]]:
            raise CorruptFileError(f"cannot read {str(path)!r}: tensor {name!r} is malformed")
        dtypes[name], shapes[name] = info["dtype"], tuple(shape)
        spans.append(tuple(offsets))
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            raise CorruptFileError(f"cannot read {str(path)!r}: the tensors' byte ranges overlap or leave gaps")
        end = stop
    if end != data_bytes:
        raise CorruptFileError(
            f"cannot read {str(path)!r}: the header describes {end} bytes of tensors, the file "
            f"holds {data_bytes} (truncated or padded?)"
        )
    return Header(dtypes, shapes, metadata)


class SafetensorsFile:
    """One open safetensors file: `header` parsed and checked for structure on opening,
    `tensors()` reads the data from the same open file (`open_safetensors`)."""

    def __init__(self, path: Path, f: Any) -> None:
        self.path, self._f = path, f
        size = os.fstat(f.fileno()).st_size
        self._prefix = f.read(8)
        n = int.from_bytes(self._prefix, "little") if len(self._prefix) == 8 else -1
        if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
            raise CorruptFileError(f"cannot read {str(path)!r}: not a safetensors file (bad header size)")
        self._raw = f.read(n)
        self._size = size
        self.header = _parse_header(self._raw, size - 8 - n, path)

    def tensors(self) -> Weights:
        """Every tensor, from the bytes of this open file (header included, compared)."""
        self._f.seek(0)
        data = self._f.read()  # the same open file: a rename by a concurrent save cannot reach it
        if len(data) != self._size or data[: 8 + len(self._raw)] != self._prefix + self._raw:
            raise CorruptFileError(f"cannot read {str(self.path)!r}: it changed while being read")
        try:
            return load(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise CorruptFileError(f"cannot read {str(self.path)!r}: {e}") from e


@contextmanager
def open_safetensors(path: Path) -> Iterator[SafetensorsFile]:
    """Open a safetensors file once; read its header; the caller checks it against the model
    before asking for any tensor data. The tensors, the metadata and so the save id come from
    the same open file: a concurrent save (which replaces the file by a rename) gives this
    reader the old file or the new one, never parts of both."""
    if not path.is_file():
        raise MissingFileError(f"{str(path)!r} does not exist")
    try:
        f = open(path, "rb")  # noqa: SIM115  (closed below, after the caller's reads)
    except OSError as e:
        raise CorruptFileError(f"cannot read {str(path)!r}: {e}") from e
    try:
        yield SafetensorsFile(path, f)
    except SoftMaskError:
        raise
    except OSError as e:  # a read error (the file itself, not ours: MissingFileError is one)
        raise CorruptFileError(f"cannot read {str(path)!r}: {e}") from e
    finally:
        f.close()


def read_safetensors(
    path: Path, check: Callable[[Header], None] | None = None
) -> tuple[Weights, Header]:
    """Read a safetensors file once: header, `check(header)` (raises the caller's error before
    a byte of tensor data is read, however large the file claims to be), then the data."""
    with open_safetensors(path) as f:
        if check is not None:
            check(f.header)
        return f.tensors(), f.header


@dataclass(frozen=True)
class SavedWeights:
    """The base model's weights as read (validated) from a save: `tensors` for a plain or
    transformers model, `adapters` (name -> tensors) for a PeftModel; `save_id` from the same
    bytes."""

    save_id: str
    tensors: Weights | None = None
    adapters: dict[str, Weights] | None = None


def read_weights(
    model: nn.Module, directory: Path, added: Mapping[str, tuple[int, ...]] = {}
) -> SavedWeights:
    """Read the saved weights for `model` (plus parameters `added` before loading, e.g. new
    heads), each file once, its header validated against the model before its data is read.
    Nothing in `model` changes.
    """
    peft_saved = (directory / ADAPTER_CONFIG).is_file() or any(
        directory.glob(f"*/{ADAPTER_CONFIG}")
    )
    if _is_peft(model):
        return _read_adapters(model, directory)
    if peft_saved:
        raise ConfigError(
            f"{str(directory)!r} holds PEFT adapters but the model is a "
            f"{type(model).__name__}, not a PeftModel (a merged model has no adapter weights to "
            "mask): load it with PeftModel.from_pretrained(base, dir, is_trainable=True) first"
        )

    def check(head: Header) -> None:
        saved_class = head.metadata.get("model_class") or _config_model_type(directory)
        _check_state(model, head.shapes, added, saved_class)

    tensors, head = read_safetensors(directory / WEIGHTS_NAME, check)
    return SavedWeights(head.metadata.get("save_id", ""), tensors=tensors)


def load_weights(model: nn.Module, weights: SavedWeights) -> None:
    """Copy weights `read_weights` validated into `model` (its heads already expanded)."""
    if weights.adapters is not None:
        from peft import set_peft_model_state_dict

        for adapter, tensors in weights.adapters.items():
            set_peft_model_state_dict(model, tensors, adapter_name=adapter)
        return
    with torch.no_grad():
        state = model.state_dict()
        for key, value in (weights.tensors or {}).items():
            state[key].copy_(value)


def _config_model_type(directory: Path) -> str:
    """The saved transformers model's class, from its config.json (best effort, for messages)."""
    try:
        data = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        return ", ".join(data.get("architectures") or []) or str(data.get("model_type", ""))
    except (OSError, ValueError, AttributeError, RecursionError):
        return ""


def _read_adapters(model: nn.Module, directory: Path) -> SavedWeights:
    from peft import get_peft_model_state_dict

    _check_not_merged(model)
    check_adapter_names(list(model.peft_config))
    frozen = [a for a, c in model.peft_config.items() if getattr(c, "inference_mode", False)]
    if frozen:
        raise ConfigError(
            f"adapter(s) {frozen} were loaded for inference, so nothing is left to train or mask: "
            "load them with PeftModel.from_pretrained(base, dir, is_trainable=True)"
        )
    ids, adapters = set(), {}
    for adapter in model.peft_config:
        folder = _adapter_dir(directory, adapter)
        if not (folder / ADAPTER_WEIGHTS).is_file():
            raise MissingFileError(
                f"no {ADAPTER_WEIGHTS} for adapter {adapter!r} in {str(folder)!r}; the save "
                f"holds adapters {_saved_adapters(directory)}"
            )
        expected = get_peft_model_state_dict(model, adapter_name=adapter)

        def check(head: Header, adapter: str = adapter, expected: dict = expected) -> None:
            shapes = head.shapes
            problems = [f"{adapter}: missing {k!r}" for k in sorted(set(expected) - set(shapes))]
            problems += [f"{adapter}: unexpected {k!r}" for k in sorted(set(shapes) - set(expected))]
            problems += [
                f"{adapter}: {k} saved shape {shapes[k]} != model {tuple(v.shape)}"
                for k, v in expected.items()
                if k in shapes and shapes[k] != tuple(v.shape)
            ]
            if problems:
                raise WeightsMismatchError(
                    "saved adapters do not fit this model:\n  " + "\n  ".join(problems)
                )

        adapters[adapter], head = read_safetensors(folder / ADAPTER_WEIGHTS, check)
        ids.add(head.metadata.get("save_id", ""))
    if len(ids) != 1:
        raise CorruptFileError(f"the adapter files in {str(directory)!r} come from different saves")
    return SavedWeights(ids.pop(), adapters=adapters)


def _saved_adapters(directory: Path) -> list[str]:
    names = ["default"] if (directory / ADAPTER_CONFIG).is_file() else []
    return names + sorted(p.parent.name for p in directory.glob(f"*/{ADAPTER_CONFIG}"))


def _memory_span(t: Tensor) -> tuple[int, int, int]:
    """(storage pointer, first element, one past the last element) of a tensor's memory."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) if t.numel() else -1
    return t.untyped_storage().data_ptr(), t.storage_offset(), t.storage_offset() + last + 1


def _summary(kind: str, keys: list[str], shown: int = 5) -> str:
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return f"{len(keys)} {kind}: " + ", ".join(repr(k) for k in keys[:shown]) + more


def _check_state(
    model: nn.Module,
    saved: Mapping[str, tuple[int, ...]],
    added: Mapping[str, tuple[int, ...]],
    saved_class: str,
) -> None:
    """All saved keys exist (or will, `added`) with equal shapes; a key not saved must lie
    inside a saved tensor's memory (tied weights, views), else it would keep stale values.
    One error summarises every problem (counts, a few examples, the saved model's class).
    """
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()} | dict(added)
    unexpected = sorted(set(saved) - set(shapes))
    spans = [_memory_span(state[k]) for k in saved if k in state]
    missing = sorted(set(added) - set(saved))
    for k in sorted(set(state) - set(saved)):
        ptr, start, end = _memory_span(state[k])
        if not any(p == ptr and s <= start and end <= e for p, s, e in spans):
            missing.append(k)
    wrong = [
        f"{k}: saved {saved[k]} != model {shapes[k]}"
        for k in sorted(set(saved) & set(shapes))
        if tuple(saved[k]) != shapes[k]
    ]
    parts = [
        p
        for p in (
            unexpected and _summary("unexpected weight(s)", unexpected),
            missing and _summary("missing weight(s)", missing),
            wrong and _summary("shape mismatch(es)", wrong, 3),
        )
        if p
    ]
    if parts:
        origin = f"saved from a {saved_class}" if saved_class else "saved from another model"
        raise WeightsMismatchError(
            f"the saved weights ({origin}) do not fit this {type(model).__name__}:\n  "
            + "\n  ".join(parts)
            + "\nload them into the same architecture they were saved from"
        )
