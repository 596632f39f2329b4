"""ImportanceStore: max-accumulation, history, the task log and general importance."""

from __future__ import annotations

import pytest
import torch

from softmask_peft import TaskOrderError, TaskRecord
from softmask_peft.store import ImportanceStore


def test_close_max_accumulates_and_keeps_history():
    store = ImportanceStore()
    t0 = {"w": torch.tensor([0.1, 0.9, 0.5])}
    t1 = {"w": torch.tensor([0.4, 0.2, 0.5])}
    for k, t in enumerate((t0, t1)):
        assert store.open(TaskRecord(f"t{k}")) == k
        store.close(t)
    assert torch.equal(store.accumulated["w"], torch.tensor([0.4, 0.9, 0.5]))
    assert store.num_tasks == 2 and store.open_task is None
    assert [t.name for t in store.tasks] == ["t0", "t1"]
    assert torch.equal(store.history[0]["w"], torch.tensor([0.1, 0.9, 0.5]))
    t0["w"].fill_(1.0)  # the store holds copies
    assert torch.equal(store.history[0]["w"], torch.tensor([0.1, 0.9, 0.5]))
    assert store.accumulated["w"] is not store.history[1]["w"]


def test_the_task_log_runs_one_ahead_while_a_task_is_open():
    store = ImportanceStore()
    store.open(TaskRecord("a", 3))
    assert store.open_task == 0 and store.num_tasks == 0
    store.open(TaskRecord("task_0", 3))  # re-opening the open task keeps its record
    assert store.tasks == [TaskRecord("a", 3)]
    with pytest.raises(TaskOrderError, match="cannot begin again with 5"):
        store.open(TaskRecord("a", 5))
    with pytest.raises(TaskOrderError):
        ImportanceStore().close({"w": torch.zeros(1)})


def test_from_parts_rebuilds_the_maximum_and_checks_the_log_length():
    h = [{"w": torch.tensor([0.2, 0.7])}, {"w": torch.tensor([0.5, 0.1])}]
    store = ImportanceStore.from_parts(h, [TaskRecord("a"), TaskRecord("b"), TaskRecord("c")])
    assert torch.equal(store.accumulated["w"], torch.tensor([0.5, 0.7]))
    assert store.open_task == 2
    with pytest.raises(TaskOrderError, match="task log"):
        ImportanceStore.from_parts(h, [TaskRecord("a")])


def test_general_importance_is_a_copy():
    store = ImportanceStore()
    g = {"u": torch.tensor([0.3])}
    store.set_general(g)
    g["u"].fill_(0.9)
    assert torch.equal(store.general["u"], torch.tensor([0.3]))
