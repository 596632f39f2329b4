"""The interface every importance method implements, and the pass that drives it.

Lifecycle (avalanche's `after_training_exp` moment): `begin_task(t)`, `accumulate(batch)` for
every batch of the task's data, `finalize()` -> this task's importance in [0, 1].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import EmptyDataError, NonFiniteGradientError

if TYPE_CHECKING:
    from ..model import SoftMaskModel


class ImportanceMethod(ABC):
    """Computes a task's importance for a `SoftMaskModel` and maps it onto parameters."""

    name: str = ""

    def __init__(self, model: SoftMaskModel) -> None:
        self.model = model

    @abstractmethod
    def begin_task(self, task_id: int) -> None:
        """Reset the accumulators for task `task_id`."""

    @abstractmethod
    def accumulate(self, batch: Any) -> None:
        """Add one batch's gradient information."""

    @abstractmethod
    def finalize(self) -> dict[str, Tensor]:
        """This task's normalised importance, keyed by store name."""

    def importance_shapes(self) -> dict[str, torch.Size]:
        """Store name -> shape of every importance tensor (parameter-level: the masked parameters)."""
        params = dict(self.model.base_model.named_parameters())
        return {name: params[name].shape for name in self.model.masked_parameter_names}

    def parameter_importance(self, importance: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Map stored importance onto parameter-shaped tensors (identity for parameter-level methods)."""
        return dict(importance)

    def run(
        self, task_id: int, batches: Iterable[Any], desc: str = "importance"
    ) -> dict[str, Tensor]:
        """begin_task -> accumulate every batch -> finalize, with a progress bar."""
        self.begin_task(task_id)
        seen = 0
        for batch in tqdm(batches, desc=desc, leave=False, disable=None):
            self.accumulate(batch)
            seen += 1
        if seen == 0:
            raise EmptyDataError(f"the importance pass of task {task_id} got no batches")
        return self.finalize()


def check_finite(grads: Mapping[str, Tensor], what: str) -> None:
    """Raise naming every tensor whose summed gradient holds NaN or Inf."""
    bad = sorted(name for name, g in grads.items() if not bool(torch.isfinite(g).all()))
    if bad:
        raise NonFiniteGradientError(
            f"{what}: NaN/Inf gradients in {', '.join(bad[:10])}"
            + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else "")
            + "; check the data and the learning rate"
        )
