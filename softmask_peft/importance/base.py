"""The interface every importance method implements, and the pass that drives it.

A method is built from what it needs (the base model, the names of the masked parameters, its
own config) and never holds the `SoftMaskModel`. A pass is an explicit value, as optax keeps
state: `state = method.start(t)`, `state = method.add(state, batch)` for every batch of the
task's data, `method.result(state, general)` -> this task's importance in [0, 1]. Nothing a
second call does can reset a pass in progress.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import agreement
from ..errors import ConfigError, EmptyDataError, NonFiniteGradientError

Importance = dict[str, Tensor]
Shape = Callable[[Importance], Importance]


class ImportanceMethod(ABC):
    """Computes a task's importance and maps stored importance onto parameters."""

    name: str = ""

    def __init__(self, base_model: nn.Module, masked: Sequence[str], config: Any) -> None:
        self.base_model = base_model
        self.masked = list(masked)
        self.config = config

    @abstractmethod
    def start(self, task_id: int) -> Any:
        """A fresh accumulator for task `task_id`'s importance pass."""

    @abstractmethod
    def add(self, state: Any, batch: Any) -> Any:
        """Add one batch's gradient information to `state`; return the state."""

    @abstractmethod
    def result(
        self, state: Any, general: Mapping[str, Tensor] | None, shape: Shape | None = None
    ) -> Importance:
        """This task's normalised importance, keyed by store name; `shape` (the capacity
        options, `capacity.shape_task_importance`) applies to the task's own importance only,
        before anything general is merged in."""

    @abstractmethod
    def training_loss(
        self, batch: Any, accumulated: Mapping[str, Tensor], general: Mapping[str, Tensor] | None
    ) -> Tensor:
        """The loss to train a task on (the task loss, plus any method-specific term)."""

    def adds_loss_term(self) -> bool:
        """True when `training_loss` adds a term to the model's own loss (DAS's contrastive
        term): a host loop that computes the loss itself (a Trainer) must call it instead."""
        return False

    def importance_shapes(self) -> dict[str, torch.Size]:
        """Store name -> shape of every importance tensor (parameter-level: the masked parameters)."""
        params = dict(self.base_model.named_parameters())
        return {name: params[name].shape for name in self.masked}

    def storable_shapes(self) -> dict[str, torch.Size]:
        """Names a saved importance may hold, with their shapes: every parameter of the model,
        since the masked set may change between tasks (a new adapter, a frozen layer)."""
        return {name: p.shape for name, p in self.base_model.named_parameters()}

    def required_importance(self) -> set[str]:
        """Names a saved accumulated importance must hold (parameter-level: none)."""
        return set()

    def parameter_importance(
        self, accumulated: Mapping[str, Tensor], general: Mapping[str, Tensor] | None
    ) -> Importance:
        """Parameter-shaped importance (identity for parameter-level methods)."""
        return dict(accumulated)

    def general_importance(self, batches: Iterable[Any]) -> Importance:
        """Importance of what the model knows before the first task (methods that define it)."""
        raise ConfigError(f"method {self.name!r} has no general importance (DAS has)")

    def run(
        self,
        task_id: int,
        batches: Iterable[Any],
        general: Mapping[str, Tensor] | None = None,
        shape: Shape | None = None,
    ) -> Importance:
        """start -> add every batch -> result. Under data parallelism the ranks agree that every
        local pass succeeded, on the same model, before `result` sums across them."""
        what = f"{self.name} importance of task {task_id}"
        with agreement(what, self.importance_shapes):
            state = self.start(task_id)
            seen = 0
            for batch in batches:
                state = self.add(state, batch)
                seen += 1
            if seen == 0:
                raise EmptyDataError(f"the importance pass of task {task_id} got no batches")
        return self.result(state, general, shape)


def check_finite(grads: Mapping[str, Tensor], what: str) -> None:
    """Raise naming every tensor whose summed gradient holds NaN or Inf."""
    bad = sorted(name for name, g in grads.items() if not bool(torch.isfinite(g).all()))
    if bad:
        raise NonFiniteGradientError(
            f"{what}: NaN/Inf gradients in {', '.join(bad[:10])}"
            + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else "")
            + "; check the data and the learning rate"
        )
