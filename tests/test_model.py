"""SoftMaskModel: wrapping, task lifecycle, and persistence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    ENDS_UNTRAINED,
    classification_batches,
    linear_model,
    multi_head,
    run_tasks,
    small_mlp,
    text_batches,
    tiny_bert,
)
from torch import nn

from softmask_peft import (
    ImportanceMismatchError,
    SoftMaskConfig,
    SoftMaskModel,
    SoftMaskOptimizer,
    TaskOrderError,
    get_softmask_model,
)


def test_wrapper_delegates_forward_and_attributes():
    net = small_mlp(in_features=6).eval()
    model = get_softmask_model(net, SoftMaskConfig())
    assert model.base_model is net
    x = torch.randn(2, 6)
    torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)
    assert model.fc1 is net.fc1
    assert isinstance(model.softmask_config, SoftMaskConfig)
    with pytest.raises(AttributeError):
        _ = model.does_not_exist
    assert {n for n, _ in model.named_parameters()} == {
        f"base_model.{n}" for n, _ in net.named_parameters()
    }


def test_wrapper_rejects_wrong_types():
    with pytest.raises(TypeError, match="nn.Module"):
        SoftMaskModel("not a model", SoftMaskConfig())
    with pytest.raises(TypeError, match="SoftMaskConfig"):
        SoftMaskModel(nn.Linear(2, 2), {"method": "spg"})


def test_hf_model_config_falls_through():
    net = tiny_bert()
    model = get_softmask_model(net, SoftMaskConfig(head_modules=["classifier"]))
    assert model.config is net.config
    batch = text_batches()[0]
    out = model(**batch)
    assert out.loss is not None and out.logits.shape == (4, 3)


def test_task_order_is_enforced():
    model = get_softmask_model(linear_model(6), SoftMaskConfig())
    with pytest.raises(TaskOrderError, match="end_task"):
        model.end_task(classification_batches(in_features=6))
    with pytest.raises(TaskOrderError, match="the next task is 0"):
        model.begin_task(1)
    model.begin_task(0)
    model.end_task(classification_batches(in_features=6))
    with pytest.raises(TaskOrderError, match="end_task"):
        model.end_task(classification_batches(in_features=6))
    with pytest.raises(TaskOrderError, match="the next task is 1"):
        model.begin_task(0)
    with pytest.raises(TaskOrderError, match="no importance for task 1"):
        model.task_importance(1)


def test_importance_keys_are_the_base_models_parameter_names():
    net = small_mlp(in_features=6)
    model = run_tasks(get_softmask_model(net, SoftMaskConfig()), 2)
    assert list(model.importance) == [n for n, _ in net.named_parameters()]
    assert model.masked_parameter_names == list(model.importance)
    pi = model.parameter_importance()
    assert all(torch.equal(pi[k], model.importance[k]) for k in pi)
    for k, p in net.named_parameters():
        a = model.importance[k]
        assert a.shape == p.shape and a.dtype == torch.float32
        assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_importance_keys_on_bert_with_targets():
    net = tiny_bert()
    model = get_softmask_model(
        net, SoftMaskConfig(target_modules=["query", "value"], head_modules=["classifier"])
    )
    model.begin_task(0)
    model.end_task(text_batches())
    names = [n for n, _ in net.named_parameters()]
    assert all(k in names for k in model.importance)
    assert len(model.importance) == 8
    assert all((".query." in k or ".value." in k) for k in model.importance)



def test_attribute_lookup_on_an_uninitialised_wrapper_does_not_recurse():
    bare = SoftMaskModel.__new__(SoftMaskModel)
    with pytest.raises(AttributeError):
        _ = bare.config



def test_a_new_head_is_adopted_even_if_the_masks_are_rebuilt_before_the_first_step():
    net = multi_head()
    model = get_softmask_model(net, SoftMaskConfig())
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    model.begin_task(0, num_classes=3)
    model.end_task(classification_batches())
    model.begin_task(1, num_classes=2)
    model.refresh_masks()  # e.g. a callback, or begin_task(1) called twice
    model.begin_task(1, num_classes=2)
    before = net.heads[1].weight.detach().clone()
    opt.zero_grad()
    x, y = classification_batches(num_classes=2)[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(net.heads[1].weight, before)


@ENDS_UNTRAINED
def test_a_checkpoint_reloads_after_the_masked_set_changed_between_tasks(tmp_path):
    net = small_mlp(in_features=6)
    model = run_tasks(get_softmask_model(net, SoftMaskConfig()), 1)
    net.fc1.requires_grad_(False)  # task 1 trains only fc2
    model.begin_task(1)
    model.end_task(classification_batches(n=12, in_features=6, seed=30))
    model.save_pretrained(tmp_path)
    fresh = small_mlp(seed=3, in_features=6)
    fresh.fc1.requires_grad_(False)
    loaded = SoftMaskModel.from_pretrained(fresh, tmp_path)
    assert set(loaded.task_importance(0)) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert set(loaded.task_importance(1)) == {"fc2.weight", "fc2.bias"}
    assert set(loaded.parameter_importance()) == {"fc2.weight", "fc2.bias"}  # masked now
    assert torch.equal(loaded.importance["fc1.weight"], model.importance["fc1.weight"])


def test_general_importance_from_elsewhere_is_checked():
    model = get_softmask_model(tiny_bert(dropout=0.1), SoftMaskConfig(method="das"))
    good = {k: torch.full(s, 0.5) for k, s in model.method.importance_shapes().items()}
    bad = dict(good, **{next(iter(good)): torch.full(next(iter(good.values())).shape, 2.0)})
    with pytest.raises(ImportanceMismatchError, match=r"values outside \[0, 1\]"):
        model.set_general_importance(bad)
    assert model.store.general is None
    model.set_general_importance(good)
    assert model.store.general.keys() == good.keys()
