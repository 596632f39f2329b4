"""The importance store: what a run has learned so far.

Holds the accumulated importance `A`, each task's importance, the task log (name and class
count per task) and DAS's general importance. `SoftMaskModel` owns one store and is the only
writer; `persistence.py` turns it into tensors and back.

    A^t = max(A^{t-1}, γ^t) elementwise, A^{-1} = 0        (Konishi et al. 2023, eq. 6)
    A^t = max(d · A^{t-1}, γ^t)                            with importance_decay d < 1
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import TaskOrderError


@dataclass(frozen=True)
class TaskRecord:
    """One entry of the task log: the task's name and its head's class count (None: shared)."""

    name: str
    num_classes: int | None = None


def _own(importance: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in importance.items()}


class ImportanceStore:
    """Accumulated importance, per-task history, task log and general importance.

    A task is *open* between `open` and `close`: the log then holds one more record than the
    history.
    """

    def __init__(self) -> None:
        self.accumulated: dict[str, Tensor] = {}
        self.history: list[dict[str, Tensor]] = []
        self.tasks: list[TaskRecord] = []
        self.general: dict[str, Tensor] | None = None

    @property
    def num_tasks(self) -> int:
        """Tasks whose importance has been recorded."""
        return len(self.history)

    @property
    def open_task(self) -> int | None:
        """The id of the task begun and not yet ended, if any."""
        return len(self.history) if len(self.tasks) > len(self.history) else None

    def open(self, record: TaskRecord) -> int:
        """Begin the next task; re-opening the open task must not change its class count."""
        if self.open_task is None:
            self.tasks.append(record)
        elif self.tasks[-1].num_classes != record.num_classes:
            raise TaskOrderError(
                f"task {len(self.history)} is open with {self.tasks[-1].num_classes} classes; "
                f"it cannot begin again with {record.num_classes}"
            )
        return len(self.history)

    def close(self, importance: Mapping[str, Tensor], decay: float = 1.0) -> None:
        """Record the open task's importance and accumulate it: A = max(decay · A, γ)."""
        if self.open_task is None:
            raise TaskOrderError("end_task() without a matching begin_task()")
        self._append(importance, decay)

    def _append(self, importance: Mapping[str, Tensor], decay: float = 1.0) -> None:
        task = _own(importance)
        if decay != 1.0:  # earlier values fade, a name this task does not cover included
            self.accumulated = {k: v * decay for k, v in self.accumulated.items()}
        for name, value in task.items():
            old = self.accumulated.get(name)
            self.accumulated[name] = value.clone() if old is None else torch.maximum(old, value)
        self.history.append(task)

    def set_general(self, importance: Mapping[str, Tensor]) -> None:
        """Keep the general importance (DAS: what the base model knows before the first task)."""
        self.general = _own(importance)

    @classmethod
    def from_parts(
        cls,
        history: list[Mapping[str, Tensor]],
        tasks: list[TaskRecord],
        accumulated: Mapping[str, Tensor] | None = None,
        general: Mapping[str, Tensor] | None = None,
    ) -> ImportanceStore:
        """A store from loaded parts; `accumulated` defaults to the max over `history`."""
        if not len(history) <= len(tasks) <= len(history) + 1:
            raise TaskOrderError(
                f"a task log of {len(tasks)} task(s) cannot go with {len(history)} recorded"
            )
        store = cls()
        store.tasks = list(tasks)
        for task in history:
            store._append(task)
        if accumulated is not None:
            store.accumulated = _own(accumulated)
        store.general = None if general is None else _own(general)
        return store
