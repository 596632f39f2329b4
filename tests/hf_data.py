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


def trainer_kwargs(output_dir, **overrides) -> dict:
    """TrainingArguments / SFTConfig keywords for fast, deterministic CPU runs in tests."""
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return kwargs
