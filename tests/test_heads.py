"""MultiHeadClassifier: one linear head per task on a shared backbone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from softmask_peft import SoftMaskConfig, TaskOrderError, TaskRecord, get_softmask_model
from softmask_peft.heads import MultiHeadClassifier, expand_heads


def test_add_head_returns_index_and_activates_it():
    net = MultiHeadClassifier(nn.Identity(), 4)
    with pytest.raises(TaskOrderError, match="0 head"):
        net(torch.zeros(1, 4))
    assert net.add_head(2) == 0
    assert net.add_head(5) == 1
    assert net.active_task == 1
    assert [h.out_features for h in net.heads] == [2, 5]


def test_forward_is_the_chosen_heads_affine_map_of_the_features():
    net = MultiHeadClassifier(nn.Identity(), 3)
    net.add_head(2)
    net.add_head(4)
    x = torch.randn(5, 3)
    for t in (0, 1):
        W, b = net.heads[t].weight, net.heads[t].bias
        torch.testing.assert_close(net(x, task_id=t), x @ W.T + b)
    torch.testing.assert_close(net(x), net(x, task_id=1))
    outs = net.forward_all(x)
    assert [o.shape for o in outs] == [(5, 2), (5, 4)]
    torch.testing.assert_close(outs[0], net(x, task_id=0))
    with pytest.raises(TaskOrderError, match="task 2"):
        net(x, task_id=2)


def test_features_is_the_backbone():
    backbone = nn.Linear(3, 4)
    net = MultiHeadClassifier(backbone, 4)
    x = torch.randn(2, 3)
    torch.testing.assert_close(net.features(x), backbone(x))


def test_new_head_follows_backbone_dtype():
    net = MultiHeadClassifier(nn.Linear(3, 4).double(), 4)
    net.add_head(2)
    assert net.heads[0].weight.dtype == torch.float64


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_sizes(bad):
    with pytest.raises(ValueError, match="feature_dim"):
        MultiHeadClassifier(nn.Identity(), bad)
    net = MultiHeadClassifier(nn.Identity(), 2)
    with pytest.raises(ValueError, match="num_classes"):
        net.add_head(bad)


def test_expand_heads_rebuilds_saved_heads():
    net = MultiHeadClassifier(nn.Linear(3, 4), 4)
    expand_heads(net, [2, 3, 5])
    assert [h.out_features for h in net.heads] == [2, 3, 5] and net.active_task == 2
    fresh = MultiHeadClassifier(nn.Linear(3, 4), 4)
    with pytest.raises(TaskOrderError, match="class count"):
        expand_heads(fresh, [None])
    plain = nn.Linear(3, 4)
    expand_heads(plain, [2])  # not a multi-head model: nothing to do
    assert not hasattr(plain, "heads")


def test_begin_task_adds_one_head_per_task_and_needs_num_classes():
    net = MultiHeadClassifier(nn.Linear(3, 4), 4)
    model = get_softmask_model(net, SoftMaskConfig())
    with pytest.raises(TaskOrderError, match="num_classes"):
        model.begin_task(0)
    model.begin_task(0, num_classes=2)
    model.begin_task(0, num_classes=2)  # re-entering the running task adds nothing
    assert len(net.heads) == 1
    assert model.task_log == (TaskRecord("task_0", 2),)
    model.end_task([(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))])
    model.begin_task(1, num_classes=3, name="second")
    assert [h.out_features for h in net.heads] == [2, 3] and net.active_task == 1
    assert [t.name for t in model.task_log] == ["task_0", "second"]
    assert model.head_parameter_names == [
        "heads.0.weight",
        "heads.0.bias",
        "heads.1.weight",
        "heads.1.bias",
    ]


def test_default_heads_are_only_the_top_level_task_heads():
    backbone = nn.Sequential()
    backbone.add_module("body", nn.Linear(4, 6))
    backbone.add_module("heads", nn.Linear(6, 5))
    model = get_softmask_model(MultiHeadClassifier(backbone, 5), SoftMaskConfig())
    model.begin_task(0, num_classes=2)
    assert model.masked_parameter_names == [
        "backbone.body.weight",
        "backbone.body.bias",
        "backbone.heads.weight",
        "backbone.heads.bias",
    ]
    assert model.head_parameter_names == ["heads.0.weight", "heads.0.bias"]


def test_the_current_head_comes_from_the_store_alone():
    """One source for the current task: the store's open task, else the last one learned."""
    net = MultiHeadClassifier(nn.Linear(3, 4), 4)
    for n in (2, 3, 5):  # heads declared ahead of the tasks (as a device export does)
        net.add_head(n)
    model = get_softmask_model(net, SoftMaskConfig())
    x = torch.randn(6, 3)
    model.begin_task(0, num_classes=2)
    assert model(x).shape == (6, 2)  # task 0's head, not the newest (5 classes)
    model.end_task([(x, torch.zeros(6, dtype=torch.long))])
    assert model.current_task is None
    assert model(x).shape == (6, 2)  # after end_task: the last task learned
    assert model(x, task_id=2).shape == (6, 5)  # an explicit id wins
    assert model(x, 1).shape == (6, 3)
    model.begin_task(1, num_classes=3)
    assert model(x).shape == (6, 3)
    assert net(x).shape == (6, 5)  # the bare classifier: its newest head
    assert "active_task" not in vars(net)  # nothing to keep in sync with the store
    with pytest.raises(AttributeError):
        net.active_task = 0
