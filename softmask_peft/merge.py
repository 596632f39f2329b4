"""Serve a merged model, keep learning on the adapter: the merge workflow for PeftModels.

`merge_and_unload()` folds LoRA into the base weights and removes the adapter layers, and with
them what the importance refers to: the continual line would end there (`save_pretrained`
refuses a merged PeftModel). `save_merged` merges a *copy* instead:

    softmask.save_pretrained("run/continual")     # adapter + importance: the next task starts here
    save_merged(softmask, "run/serve")            # plain transformers folder for serving
    AutoModelForCausalLM.from_pretrained("run/serve")

The copy costs one model's memory for the duration of the save; the wrapped model is unchanged.
With the LoRA subspace mask the base weights already hold every finished task (folded at each
task's end, `lora_subspace.py`): the merge adds the open task's adapter.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from .errors import ConfigError
from .model import SoftMaskModel


def save_merged(model: SoftMaskModel, directory: str | os.PathLike) -> None:
    """Write `model`'s PeftModel with its adapters merged (W + B·A·α/r) as a plain transformers
    folder (`save_pretrained` of the merged base model); the adapter and importance stay as they
    are in `model`, ready for the next task."""
    from peft import PeftModel

    if not isinstance(model, SoftMaskModel):
        raise ConfigError(f"save_merged needs a SoftMaskModel, got {type(model).__name__}")
    peft_model = model.base_model
    if not isinstance(peft_model, PeftModel):
        raise ConfigError(
            f"save_merged merges PEFT adapters; this model wraps a {type(peft_model).__name__} "
            "(save it with its own save_pretrained)"
        )
    merged = copy.deepcopy(peft_model).merge_and_unload()
    Path(directory).mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(directory))
