"""Budget and options of the DAS-vs-naive continual pre-training run (`das-pretrain`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _opt(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass
class PretrainSettings:
    """Budget and options of one DAS-vs-naive run (the defaults take < 10 min on 2 CPU cores)."""

    steps: int = _opt(32, "AdamW steps per domain (both methods)")
    batch_size: int = _opt(8, "sequences per batch")
    seq_len: int = _opt(64, "tokens per sequence (truncation)")
    lr: float = _opt(1e-4, "AdamW learning rate of the domain training")
    head_steps: int = _opt(120, "AdamW steps of the MLM-head training (backbone frozen)")
    head_lr: float = _opt(3e-3, "learning rate of the MLM-head training")
    head_maskings: int = _opt(4, "maskings of the general train set the head is trained on")
    head_tokens: int = _opt(256, "predicted tokens per head-training step")
    adapt_steps: int = _opt(96, "whole-model MLM steps on the general set after the head (0: none)")
    adapt_lr: float = _opt(1e-4, "learning rate of the MLM adaptation")
    matched_lr: float = _opt(5e-5, "lr of a second naive run for the matched comparison (0: none)")
    importance_batches: int = _opt(4, "batches of a domain used by each importance pass")
    max_passages: int = _opt(200, "passages per domain (train + eval)")
    eval_passages: int = _opt(32, "eval passages per set (domains, general = probe set)")
    mask_mode: str = _opt("update", "DAS soft-masking: 'update' (AdamW-proof) or 'grad' (paper)")
    contrastive_weight: float = _opt(1.0, "weight of DAS's contrastive integration loss")
    seed: int = _opt(0, "seed of data order, masking and initialisation")
