"""MLM batches: tokenised passages and BERT's masking (fixed for evaluation, fresh for training)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Batch = dict[str, Tensor]


@dataclass
class Encoded:
    """Tokenised passages, padded per batch."""

    batches: list[Batch]


def encode(texts: list[str], tokenizer: Any, seq_len: int, batch_size: int) -> Encoded:
    """Tokenise (truncated to seq_len) into batches of input_ids + attention_mask."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size],
            truncation=True,
            max_length=seq_len,
            padding=True,
            return_tensors="pt",
        )
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return Encoded(out)


def mask_tokens(
    batch: Batch, tokenizer: Any, generator: torch.Generator, prob: float = 0.15
) -> Batch:
    """BERT MLM corruption of one batch; labels are -100 except at predicted positions."""
    ids = batch["input_ids"]
    special = torch.isin(ids, torch.tensor(sorted(tokenizer.all_special_ids)))
    candidate = batch["attention_mask"].bool() & ~special
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & candidate
    empty = ~chosen.any(dim=1) & candidate.any(dim=1)
    first = candidate.float().argmax(dim=1)
    chosen[empty, first[empty]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=generator)
    corrupted = ids.clone()
    corrupted[chosen & (r < 0.8)] = tokenizer.mask_token_id
    random_ids = torch.randint(len(tokenizer), ids.shape, generator=generator)
    swap = chosen & (r >= 0.8) & (r < 0.9)
    corrupted[swap] = random_ids[swap]
    return {"input_ids": corrupted, "attention_mask": batch["attention_mask"], "labels": labels}


def fixed_mlm_batches(enc: Encoded, tokenizer: Any, seed: int) -> list[Batch]:
    """MLM batches with one fixed masking (for evaluation and importance passes)."""
    g = torch.Generator().manual_seed(seed)
    return [mask_tokens(b, tokenizer, g) for b in enc.batches]


def training_stream(enc: Encoded, tokenizer: Any, steps: int, seed: int) -> Iterator[Batch]:
    """`steps` MLM batches: shuffled epochs over the batches, fresh masking every step."""
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        for i in torch.randperm(len(enc.batches), generator=g).tolist():
            if done == steps:
                return
            yield mask_tokens(enc.batches[i], tokenizer, g)
            done += 1
