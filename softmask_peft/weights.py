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
importance from two different saves are never paired.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file, save_model
from torch import Tensor, nn

from .constants import WEIGHTS_NAME
from .errors import ConfigError, CorruptFileError, ImportanceMismatchError, MissingFileError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

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
    metadata = {"format": "pt", "save_id": save_id}
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


def _read(path: Path) -> tuple[dict[str, Tensor], str]:
    if not path.is_file():
        raise MissingFileError(f"{str(path)!r} does not exist")
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            save_id = (f.metadata() or {}).get("save_id", "")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptFileError(f"cannot read {path}: {e}") from e
    return tensors, save_id


def read_weights(model: nn.Module, directory: Path) -> tuple[Callable[[], None], str]:
    """Validate the saved weights against `model` without changing it.

    Returns `(apply, save_id)`: `apply()` copies the weights into `model`. Raises if a file is
    missing, a key is missing or unexpected, or a shape differs.
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
    weights, save_id = _read(directory / WEIGHTS_NAME)
    _check_weights(model, weights)

    def apply() -> None:
        with torch.no_grad():
            state = model.state_dict()
            for key, value in weights.items():
                state[key].copy_(value)

    return apply, save_id


def _read_adapters(model: nn.Module, directory: Path) -> tuple[Callable[[], None], str]:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    _check_not_merged(model)
    frozen = [a for a, c in model.peft_config.items() if getattr(c, "inference_mode", False)]
    if frozen:
        raise ConfigError(
            f"adapter(s) {frozen} were loaded for inference, so nothing is left to train or mask: "
            "load them with PeftModel.from_pretrained(base, dir, is_trainable=True)"
        )
    loaded: dict[str, dict[str, Tensor]] = {}
    ids = set()
    problems = []
    for adapter in model.peft_config:
        folder = _adapter_dir(directory, adapter)
        if not (folder / ADAPTER_WEIGHTS).is_file():
            raise MissingFileError(
                f"no {ADAPTER_WEIGHTS} for adapter {adapter!r} in {str(folder)!r}; the save "
                f"holds adapters {_saved_adapters(directory)}"
            )
        tensors, save_id = _read(folder / ADAPTER_WEIGHTS)
        ids.add(save_id)
        expected = get_peft_model_state_dict(model, adapter_name=adapter)
        problems += [f"{adapter}: missing {k!r}" for k in sorted(set(expected) - set(tensors))]
        problems += [f"{adapter}: unexpected {k!r}" for k in sorted(set(tensors) - set(expected))]
        problems += [
            f"{adapter}: {k} saved shape {tuple(tensors[k].shape)} != model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in tensors and tensors[k].shape != v.shape
        ]
        loaded[adapter] = tensors
    if problems:
        raise ImportanceMismatchError(
            "saved adapters do not fit this model:\n  " + "\n  ".join(problems)
        )
    if len(ids) != 1:
        raise CorruptFileError(f"the adapter files in {str(directory)!r} come from different saves")

    def apply() -> None:
        for adapter, tensors in loaded.items():
            set_peft_model_state_dict(model, tensors, adapter_name=adapter)

    return apply, ids.pop()


def _saved_adapters(directory: Path) -> list[str]:
    names = ["default"] if (directory / ADAPTER_CONFIG).is_file() else []
    return names + sorted(p.parent.name for p in directory.glob(f"*/{ADAPTER_CONFIG}"))


def _memory_span(t: Tensor) -> tuple[int, int, int]:
    """(storage pointer, first element, one past the last element) of a tensor's memory."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) if t.numel() else -1
    return t.untyped_storage().data_ptr(), t.storage_offset(), t.storage_offset() + last + 1


def _check_weights(model: nn.Module, weights: dict[str, Tensor]) -> None:
    """All saved keys exist with equal shapes; a key not saved must lie inside a saved tensor.

    safetensors drops the duplicates of shared tensors (tied embeddings, views of a weight), and
    loading into the saved tensor fills them. A tensor that merely shares a storage with a saved
    one, outside its span, would keep stale values: it is reported as missing.
    """
    state = model.state_dict()
    problems = [f"unexpected weight {k!r}" for k in sorted(set(weights) - set(state))]
    saved = [_memory_span(state[k]) for k in weights if k in state]
    for k in sorted(set(state) - set(weights)):
        ptr, start, end = _memory_span(state[k])
        if not any(p == ptr and s <= start and end <= e for p, s, e in saved):
            problems.append(f"missing weight {k!r}")
    for k in sorted(set(state) & set(weights)):
        if tuple(state[k].shape) != tuple(weights[k].shape):
            problems.append(
                f"{k}: saved shape {tuple(weights[k].shape)} != model {tuple(state[k].shape)}"
            )
    if problems:
        raise ImportanceMismatchError(
            "saved weights do not fit this model:\n  " + "\n  ".join(problems)
        )
