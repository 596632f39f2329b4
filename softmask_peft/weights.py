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
importance from two different saves are never paired. Reading is two steps: `check_weights`
validates against the model from the files' headers (nothing allocated, nothing changed), then
`load_weights` copies them in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file, save_model
from softmask_format.names import WEIGHTS_NAME
from torch import Tensor, nn

from .errors import ConfigError, CorruptFileError, MissingFileError, WeightsMismatchError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _is_peft(model: nn.Module) -> bool:
    from peft import PeftModel  # peft is slow to import: only when weights are read or written

    return isinstance(model, PeftModel)


def _adapter_dir(directory: Path, adapter: str) -> Path:
    """PEFT's layout: "default" at the top, other adapters in a sub-folder of their name."""
    return directory if adapter == "default" else directory / adapter


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
        model.save_pretrained(str(staging))
        for adapter in model.peft_config:
            path = _adapter_dir(staging, adapter) / ADAPTER_WEIGHTS
            save_file(load_file(path), str(path), metadata=metadata)  # PEFT's tensors, our id
        return
    config = getattr(model, "config", None)
    if hasattr(model, "save_pretrained") and hasattr(config, "save_pretrained"):
        config.save_pretrained(staging)
    save_model(model, str(staging / WEIGHTS_NAME), metadata)


def header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shapes and metadata from a safetensors header, without reading the tensors."""
    if not path.is_file():
        raise MissingFileError(f"{str(path)!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptFileError(f"cannot read {str(path)!r}: {e}") from e


def read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, as our own error when the file is damaged."""
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptFileError(f"cannot read {str(path)!r}: {e}") from e


def check_weights(
    model: nn.Module, directory: Path, added: Mapping[str, tuple[int, ...]] = {}
) -> str:
    """Validate the saved weights against `model` (plus parameters `added` before loading, e.g.
    new heads) from the files' headers; return the save's id. Nothing is allocated or changed.
    """
    peft_saved = (directory / ADAPTER_CONFIG).is_file() or any(
        directory.glob(f"*/{ADAPTER_CONFIG}")
    )
    if _is_peft(model):
        return _check_adapters(model, directory)
    if peft_saved:
        raise ConfigError(
            f"{str(directory)!r} holds PEFT adapters but the model is a "
            f"{type(model).__name__}, not a PeftModel (a merged model has no adapter weights to "
            "mask): load it with PeftModel.from_pretrained(base, dir, is_trainable=True) first"
        )
    shapes, metadata = header(directory / WEIGHTS_NAME)
    saved_class = metadata.get("model_class") or _config_model_type(directory)
    _check_state(model, shapes, added, saved_class)
    return metadata.get("save_id", "")


def load_weights(model: nn.Module, directory: Path) -> None:
    """Copy the weights `check_weights` validated into `model`."""
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        for adapter in model.peft_config:
            tensors = read_tensors(_adapter_dir(directory, adapter) / ADAPTER_WEIGHTS)
            set_peft_model_state_dict(model, tensors, adapter_name=adapter)
        return
    weights = read_tensors(directory / WEIGHTS_NAME)
    with torch.no_grad():
        state = model.state_dict()
        for key, value in weights.items():
            state[key].copy_(value)


def _config_model_type(directory: Path) -> str:
    """The saved transformers model's class, from its config.json (best effort, for messages)."""
    try:
        data = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        return ", ".join(data.get("architectures") or []) or str(data.get("model_type", ""))
    except (OSError, ValueError, AttributeError, RecursionError):
        return ""


def _check_adapters(model: nn.Module, directory: Path) -> str:
    from peft import get_peft_model_state_dict

    _check_not_merged(model)
    frozen = [a for a, c in model.peft_config.items() if getattr(c, "inference_mode", False)]
    if frozen:
        raise ConfigError(
            f"adapter(s) {frozen} were loaded for inference, so nothing is left to train or mask: "
            "load them with PeftModel.from_pretrained(base, dir, is_trainable=True)"
        )
    ids = set()
    problems = []
    for adapter in model.peft_config:
        folder = _adapter_dir(directory, adapter)
        if not (folder / ADAPTER_WEIGHTS).is_file():
            raise MissingFileError(
                f"no {ADAPTER_WEIGHTS} for adapter {adapter!r} in {str(folder)!r}; the save "
                f"holds adapters {_saved_adapters(directory)}"
            )
        shapes, metadata = header(folder / ADAPTER_WEIGHTS)
        ids.add(metadata.get("save_id", ""))
        expected = get_peft_model_state_dict(model, adapter_name=adapter)
        problems += [f"{adapter}: missing {k!r}" for k in sorted(set(expected) - set(shapes))]
        problems += [f"{adapter}: unexpected {k!r}" for k in sorted(set(shapes) - set(expected))]
        problems += [
            f"{adapter}: {k} saved shape {shapes[k]} != model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in shapes and shapes[k] != tuple(v.shape)
        ]
    if problems:
        raise WeightsMismatchError("saved adapters do not fit this model:\n  " + "\n  ".join(problems))
    if len(ids) != 1:
        raise CorruptFileError(f"the adapter files in {str(directory)!r} come from different saves")
    return ids.pop()


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
