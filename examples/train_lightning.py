"""Soft-masked continual learning in Lightning: one `fit` per task, `SoftMaskCallback` masks.

    python examples/train_lightning.py --out runs/lightning

Two tasks on a small MLP (CPU, seconds). The callback begins each task at `on_fit_start`,
masks every optimizer step and computes the task's importance at `on_fit_end`.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from softmask_peft import SoftMaskConfig, get_softmask_model
from softmask_peft.integrations.lightning import SoftMaskCallback


class Classifier(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=1e-2)


def task_data(seed: int, n: int = 64) -> DataLoader:
    """Gaussian inputs; the label is which of 3 random directions the input points along most."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(n, 8, generator=g), torch.randn(8, 3, generator=g)
    return DataLoader(TensorDataset(x, (x @ w).argmax(1)), batch_size=16, shuffle=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    model = get_softmask_model(net, SoftMaskConfig(head_modules=["2"]))
    callback = SoftMaskCallback(model, mask_mode="update")
    module = Classifier(model)
    for seed in (0, 1):
        trainer = pl.Trainer(accelerator="cpu", max_epochs=5, callbacks=[callback], logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)  # fmt: skip
        trainer.fit(module, task_data(seed))
    model.save_pretrained(args.out)
    print(f"saved {args.out} with {model.num_tasks} tasks, head keep {model.head_keep():.3f}")


if __name__ == "__main__":
    main()
