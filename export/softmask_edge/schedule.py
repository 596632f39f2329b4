"""Validation-driven training budget on the device: lr decay on plateau and early stopping.

The same rule as the PyTorch protocol (`softmask_bench.training.fit`): after `lr_patience` epochs
without a lower validation loss the lr is multiplied by `lr_factor`; training stops after
`patience` such epochs or once the lr falls below `lr_min`; the weights of the best
validation loss are restored. The JS learner (export/js) implements the same state machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class EarlyStopping:
    """Options of `EdgeLearner.learn_task(..., validation=...)`; `epochs` stays the maximum."""

    patience: int = 10
    lr_patience: int = 3
    lr_factor: float = 1.0 / 3.0
    lr_min: float = 1e-4

    def __post_init__(self) -> None:
        if self.patience < 1 or self.lr_patience < 1:
            raise ValueError(
                f"patience and lr_patience must be >= 1, got {self.patience}, {self.lr_patience}"
            )
        if not 0 < self.lr_factor < 1:
            raise ValueError(f"lr_factor must be in (0, 1), got {self.lr_factor}")


class Plateau:
    """Tracks the best validation loss, the lr and when to stop (one instance per task)."""

    def __init__(self, options: EarlyStopping, lr: float) -> None:
        self.options = options
        self.lr = lr
        self.best = math.inf
        self.since_best = 0
        self.since_change = 0  # bad epochs since the last improvement or lr decay

    def update(self, val_loss: float) -> tuple[bool, bool]:
        """Record one epoch's validation loss; return (improved, stop). NaN never improves."""
        improved = math.isfinite(val_loss) and val_loss < self.best
        if improved:
            self.best, self.since_best, self.since_change = val_loss, 0, 0
        else:
            self.since_best += 1
            self.since_change += 1
            if self.since_change >= self.options.lr_patience:
                self.lr *= self.options.lr_factor
                self.since_change = 0
        stop = self.since_best >= self.options.patience or self.lr < self.options.lr_min
        return improved, stop
