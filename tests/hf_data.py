"""Tiny text-classification datasets as Trainer receives them (lists of examples), no download."""

from __future__ import annotations

import torch


def examples(n: int = 8, seq_len: int = 6, vocab: int = 40, num_labels: int = 3, seed: int = 2):
    """Examples with model inputs, `labels` and an extra string column Trainer must drop."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq_len), generator=g)
    labels = (ids[:, 0] % num_labels).tolist()  # learnable from the first token
    return [
        {
            "input_ids": ids[i],
            "attention_mask": torch.ones(seq_len, dtype=torch.long),
            "labels": labels[i],
            "text": f"example {i}",
        }
        for i in range(n)
    ]
