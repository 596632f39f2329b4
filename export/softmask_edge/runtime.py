"""The one interface between `EdgeLearner` and a device runtime (ONNX Runtime or ExecuTorch).

The learner owns what every runtime shares: batch checks, the task order, the training loop
with early stopping and the lr schedule, the SPG importance pass, the task history and atomic
generation saves. A runtime owns only its sessions and the tensors they hold: weights, the
stored importance A_P and ā, the optimizer, and how a step, an eval pass, the importance
update and a checkpoint file are computed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from .errors import EdgeError

Feeds = dict[str, np.ndarray]


class Runtime(Protocol):
    """What `EdgeLearner` calls; `ort_runtime.OrtRuntime` and `executorch_runtime.ExecuTorchRuntime`."""

    #: integer input name -> rows of the table it indexes (token ids); {} if unknown
    index_bounds: dict[str, int]
    #: the most rows a batch may have (ExecuTorch plans memory for a bound); None: no limit
    max_batch: int | None

    def translated(
        self, step: str, error: type[EdgeError] = ...
    ) -> contextlib.AbstractContextManager[None]:
        """Re-raise the runtime's own exceptions as `error` (default: the runtime's error type)
        naming `step`."""
        ...

    def get(self, name: str) -> np.ndarray:
        """A weight, a stored A_P (`P.softmask_importance`) or ā, as held now (no copy)."""
        ...

    def set(self, values: Mapping[str, np.ndarray]) -> None:
        """Overwrite weights and/or stored importance tensors by name."""
        ...

    def use_scale(self, scale: float) -> bool:
        """Train with keep = 1 − scale·A (1 masked, 0 raw gradients); True if the optimizer
        had to go (the next step needs `new_optimizer`). Importance changes force a rebuild."""
        ...

    def new_optimizer(self, lr: float) -> None:
        """A fresh optimizer (zero momentum / moments), as the official code per task."""
        ...

    def set_learning_rate(self, lr: float) -> None: ...

    def train_step(self, feeds: Feeds) -> float:
        """Forward, backward (gradients masked by keep), optimizer step; return the loss."""
        ...

    def eval_step(self, feeds: Feeds) -> tuple[float, np.ndarray]:
        """Eval-mode forward: (loss, logits)."""
        ...

    def gradient_sums(self, batches: Sequence[Feeds], names: Sequence[str]) -> dict[str, np.ndarray]:
        """Σ over `batches` of ∂L/∂P for every P in `names` (no step; run under scale 0)."""
        ...

    def update_importance(
        self, grads: Mapping[str, Sequence[np.ndarray]]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
        """(γ^t, A', ā') in the storage dtype from per-head gradient sums; changes nothing."""
        ...

    def write_checkpoint(self, path: str | os.PathLike) -> None:
        """Weights, stored A and ā into a new file at `path` (the caller makes it atomic)."""
        ...

    def export_inference(self, path: str | os.PathLike) -> None:
        """An inference-only model (inputs [+ task_id] -> logits) at `path`, written atomically
        (ExecuTorch: and its weights beside it, `path` with the suffix .ptd)."""
        ...
