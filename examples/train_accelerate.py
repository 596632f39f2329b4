"""Soft-masked continual training with Accelerate: one process, `torchrun` or `accelerate launch`.

    python examples/train_accelerate.py --out runs/acc1
    torchrun --standalone --nproc_per_node 2 examples/train_accelerate.py --out runs/acc2
    accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py --out runs/acc2

Two tasks on a tiny random BERT (no download). Every rank takes whole batches of the task's
data; DDP averages the gradients, so a step on 2 ranks × 4 examples equals one step on 8. The
importance pass after each task runs on each rank's shard and the library sum-all-reduces the
gradient sums, so every rank ends with the same importance as one process on all the data.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from softmask_peft import SoftMaskConfig, SoftMaskOptimizer, get_softmask_model


def task_data(seed: int, n: int = 32, seq_len: int = 8) -> list[dict[str, torch.Tensor]]:
    """Token sequences whose label is the first token mod 3 (learnable, deterministic)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, seq_len), generator=g)
    return [{"input_ids": ids[i], "labels": ids[i, 0] % 3} for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    # on a machine without GPUs Accelerate runs several processes only when told cpu=True
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = get_softmask_model(BertForSequenceClassification(config), SoftMaskConfig())
    per_device = args.global_batch // accelerator.num_processes
    for t in range(2):
        model.begin_task(t)
        loader = DataLoader(task_data(seed=t), batch_size=per_device, shuffle=False)
        optimizer = SoftMaskOptimizer(
            torch.optim.AdamW(model.parameters(), lr=1e-3), model, mask_mode="update"
        )
        ddp_model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        ddp_model.train()
        for _ in range(args.epochs):
            for batch in loader:
                optimizer.zero_grad()
                accelerator.backward(ddp_model(**batch).loss)
                optimizer.step()
        model.end_task(loader)  # this rank's shard; the sums are all-reduced
        accelerator.free_memory()
    if accelerator.is_main_process:
        model.save_pretrained(args.out)
    accelerator.wait_for_everyone()
    accelerator.print(
        f"processes={accelerator.num_processes} tasks={model.num_tasks} -> {args.out}"
    )


if __name__ == "__main__":
    main()
