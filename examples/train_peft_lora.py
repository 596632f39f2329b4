"""Soft-masked LoRA with the transformers Trainer: only adapters and importance are saved.

    python examples/train_peft_lora.py --out runs/lora

Two tasks through one shared LoRA adapter on a tiny random BERT (no download), protected by SPG
on the LoRA factors (`lora_mask="factors"`: element-wise importance, any optimizer; the default
subspace mask folds each task into the base weights and needs SGD, see train_sft_lora.py). The
save holds PEFT's own `adapter_config.json` + `adapter_model.safetensors` (no frozen backbone)
beside the softmask files; `PeftModel.from_pretrained(base, dir, is_trainable=True)` reads it
back and `SoftMaskModel.from_pretrained` restores the importance.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from softmask_peft import SoftMaskConfig, SoftMaskModel, get_softmask_model
from softmask_peft.integrations.trainer import SoftMaskTrainer


def base_model() -> BertForSequenceClassification:
    torch.manual_seed(0)  # the same frozen backbone every time (a pretrained model in practice)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def task_data(seed: int, n: int = 32, seq_len: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, seq_len), generator=g)
    return [{"input_ids": ids[i], "labels": int(ids[i, 0] + seed) % 3} for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                      modules_to_save=["classifier"])  # fmt: skip
    model = get_softmask_model(get_peft_model(base_model(), lora), SoftMaskConfig(lora_mask="factors"))
    trainer = SoftMaskTrainer(
        model,
        TrainingArguments(args.out, num_train_epochs=3, learning_rate=1e-2, report_to=[],
                          save_strategy="no", use_cpu=True, disable_tqdm=True),
        mask_mode="update",
    )  # fmt: skip
    for t in range(2):
        trainer.train_dataset = task_data(seed=t)
        trainer.begin_task(t)
        trainer.train()
        trainer.end_task()
    out = Path(args.out) / "final"
    trainer.save_model(str(out))
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    for name, size in sizes.items():
        print(f"{name:36s} {size:>9,d} bytes")

    peft_model = PeftModel.from_pretrained(base_model(), out, is_trainable=True)
    again = SoftMaskModel.from_pretrained(peft_model, out)
    print(f"reloaded: {again.num_tasks} tasks, {len(again.importance)} masked LoRA tensors")


if __name__ == "__main__":
    main()
