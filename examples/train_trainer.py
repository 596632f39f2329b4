"""Soft-masked continual learning with the transformers Trainer (default TrainingArguments).

    python examples/train_trainer.py --out runs/trainer

Two tasks on a tiny random BERT (no download): begin_task / train / end_task per task; every
checkpoint holds the softmask files beside weights `AutoModel...from_pretrained` opens.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from softmask_peft import SoftMaskConfig, get_softmask_model
from softmask_peft.integrations.trainer import SoftMaskTrainer


def task_data(seed: int, n: int = 32, seq_len: int = 8) -> list[dict]:
    """Examples whose label is (first token + seed) mod 3; the `text` column is dropped by Trainer."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, seq_len), generator=g)
    return [
        {"input_ids": ids[i], "labels": int(ids[i, 0] + seed) % 3, "text": f"ex {i}"}
        for i in range(n)
    ]


def accuracy(pred) -> dict[str, float]:
    return {"accuracy": float(np.mean(pred.predictions.argmax(-1) == pred.label_ids))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    model = get_softmask_model(BertForSequenceClassification(config), SoftMaskConfig())
    trainer = SoftMaskTrainer(
        model,
        TrainingArguments(args.out, num_train_epochs=3, learning_rate=3e-3, report_to=[],
                          save_strategy="epoch", use_cpu=True, disable_tqdm=True),
        compute_metrics=accuracy,
        mask_mode="update",  # protects under AdamW, Trainer's default optimizer
    )  # fmt: skip
    tasks = [task_data(seed=s) for s in (0, 1)]
    for t, data in enumerate(tasks):
        trainer.args.output_dir = f"{args.out}/task{t}"  # checkpoint-N of each task apart
        trainer.train_dataset = data
        trainer.begin_task(t)
        trainer.train()
        trainer.end_task()
        for j in range(t + 1):
            acc = trainer.evaluate(tasks[j], metric_key_prefix=f"task{j}")[f"task{j}_accuracy"]
            print(f"after task {t}: accuracy on task {j} = {acc:.3f}")
    trainer.save_model(f"{args.out}/final")
    print(f"saved {args.out}/final with {model.num_tasks} tasks")


if __name__ == "__main__":
    main()
