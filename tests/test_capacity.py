"""Capacity: the options that shape each task's importance, decay, and the statistics API.

Expected values are written out by hand in each test, never computed by `capacity.py`.
"""

from __future__ import annotations

import pytest
import torch
from helpers import ENDS_UNTRAINED, classification_batches, multi_head, run_tasks, small_mlp

from softmask_peft import ConfigError, SoftMaskConfig, get_softmask_model
from softmask_peft.capacity import importance_stats, shape_task_importance
from softmask_peft.config import PAPER_CAPACITY
from softmask_peft.store import ImportanceStore, TaskRecord


def test_paper_values_return_the_tensors_untouched():
    g = {"a": torch.rand(5, 3), "b": torch.rand(7)}
    out = shape_task_importance(g, 1.0, None)
    assert all(out[k] is g[k] for k in g)


def test_sharpness_raises_each_value_to_the_power():
    out = shape_task_importance({"a": torch.tensor([0.5, 0.9, 1.0, 0.0])}, 2.0, None)
    torch.testing.assert_close(out["a"], torch.tensor([0.25, 0.81, 1.0, 0.0]))


def test_budget_keeps_the_top_share_per_tensor_and_ties():
    g = torch.tensor([0.1, 0.7, 0.3, 0.7, 0.9, 0.2, 0.05, 0.6, 0.4, 0.8])
    # budget 0.3 of 10 values: the 3 largest (0.9, 0.8, 0.7) and the tie at 0.7
    out = shape_task_importance({"a": g, "b": torch.tensor([0.2, 0.4])}, 1.0, 0.3)
    assert out["a"].tolist() == pytest.approx([0, 0.7, 0, 0.7, 0.9, 0, 0, 0, 0, 0.8])
    # ceil(0.3 * 2) = 1 value of the second tensor
    assert out["b"].tolist() == pytest.approx([0.0, 0.4])


def test_budget_and_sharpness_combine():
    out = shape_task_importance({"a": torch.tensor([0.5, 0.9, 0.2, 0.8])}, 2.0, 0.5)
    torch.testing.assert_close(out["a"], torch.tensor([0.0, 0.81, 0.0, 0.64]))


def test_store_decay_fades_earlier_importance_before_the_max():
    store = ImportanceStore()
    for t, (a, decay) in enumerate([([0.8, 0.2, 0.0], 0.5), ([0.1, 0.3, 0.6], 0.5)]):
        store.open(TaskRecord(f"t{t}"))
        store.close({"w": torch.tensor(a)}, decay)
    # task 1: max(0.5 * [0.8, 0.2, 0.0], [0.1, 0.3, 0.6])
    torch.testing.assert_close(store.accumulated["w"], torch.tensor([0.4, 0.3, 0.6]))
    store.open(TaskRecord("t2"))
    store.close({"w": torch.tensor([0.0, 0.0, 0.0])}, 0.5)
    torch.testing.assert_close(store.accumulated["w"], torch.tensor([0.2, 0.15, 0.3]))


def test_importance_stats_by_hand():
    stats = importance_stats({"a": torch.tensor([0.95, 0.5]), "b": torch.tensor([[1.0, 0.0]])})
    assert stats.values == 4
    assert stats.mean_importance == pytest.approx(2.45 / 4)
    assert stats.mean_keep == pytest.approx(1 - 2.45 / 4)
    assert stats.saturation == pytest.approx(2 / 4)  # 0.95 and 1.0 are above 0.9


@pytest.mark.parametrize(
    "options",
    [
        {"importance_sharpness": 0.5},
        {"importance_sharpness": float("inf")},
        {"importance_sharpness": True},
        {"importance_budget": 0.0},
        {"importance_budget": 1.5},
        {"importance_budget": "0.1"},
        {"importance_decay": 0.0},
        {"importance_decay": 1.01},
    ],
)
def test_bad_capacity_options_are_refused_naming_the_field(options):
    with pytest.raises(ConfigError, match=next(iter(options))):
        SoftMaskConfig(**options)


def test_capacity_options_round_trip(tmp_path):
    cfg = SoftMaskConfig(importance_sharpness=3, importance_budget=0.2, importance_decay=0.9)
    cfg.save_pretrained(tmp_path)
    again = SoftMaskConfig.from_pretrained(tmp_path)
    assert again == cfg
    assert (again.importance_sharpness, again.importance_budget, again.importance_decay) == (
        3.0,
        0.2,
        0.9,
    )


def test_a_format_3_config_loads_with_the_papers_rule():
    data = SoftMaskConfig().to_dict()
    for key in PAPER_CAPACITY:
        del data[key]
    data["format_version"] = 3
    cfg = SoftMaskConfig.from_dict(data)
    assert cfg.importance_sharpness == 1.0
    assert cfg.importance_budget is None
    assert cfg.importance_decay == 1.0


@ENDS_UNTRAINED
def test_end_task_applies_budget_and_decay():
    torch.manual_seed(0)
    paper = run_tasks(get_softmask_model(small_mlp(), SoftMaskConfig(**PAPER_CAPACITY)), 2)
    torch.manual_seed(0)
    shaped = run_tasks(
        get_softmask_model(
            small_mlp(),
            SoftMaskConfig(importance_budget=0.25, importance_sharpness=1.0, importance_decay=0.5),
        ),
        1,
    )
    # task 0 saw the same weights and data: the shaped importance is the paper's, top 25 % only
    for name, g in paper.task_importance(0).items():
        kept = shaped.task_importance(0)[name]
        k = -(-g.numel() // 4)  # ceil(numel / 4)
        threshold = g.flatten().sort(descending=True).values[k - 1]
        torch.testing.assert_close(kept, torch.where(g >= threshold, g, torch.zeros_like(g)))
    before = {k: v.clone() for k, v in shaped.importance.items()}
    shaped.begin_task(1)
    batches = classification_batches(n=12, in_features=6, num_classes=3, seed=99)
    task = shaped.end_task(batches)
    for name in before:
        torch.testing.assert_close(
            shaped.importance[name], torch.maximum(0.5 * before[name], task[name])
        )


def test_capacity_report_reads_the_models_importance():
    model = get_softmask_model(multi_head(backbone="mlp"), SoftMaskConfig())
    report = model.capacity()
    assert report.overall.values == 0 and report.head_keep == 1.0 and report.per_task == ()
    model.begin_task(0, num_classes=2)
    model.end_task(classification_batches(n=8, in_features=4, num_classes=2, seed=1))
    report = model.capacity(threshold=0.5)
    every = torch.cat([a.flatten() for a in model.parameter_importance().values()])
    assert report.overall.values == every.numel() == sum(
        p.numel() for p in model.base_model.backbone.parameters()
    )
    assert report.saturation == pytest.approx(float((every > 0.5).double().mean()))
    assert report.mean_keep == pytest.approx(float(1 - every.double().mean()))
    assert report.head_keep == pytest.approx(report.mean_keep)  # what the next task's heads get
    assert len(report.per_task) == 1 and report.new_head_keep is None
    assert set(report.per_parameter) == set(model.masked_parameter_names)
    model.begin_task(1, num_classes=2)
    assert model.capacity().new_head_keep == 1.0  # except_new: the new head is unscaled
    assert model.capacity().head_keep == pytest.approx(model.keep_masks.head_keep)
    with pytest.raises(ConfigError, match="threshold"):
        model.capacity(threshold=1.0)


def test_capacity_report_under_official_head_scaling_scales_the_new_head():
    model = get_softmask_model(multi_head(), SoftMaskConfig(head_scaling="all"))
    model.begin_task(0, num_classes=2)
    batches = classification_batches(n=8, in_features=4, num_classes=2, seed=1)
    model.end_task(batches)
    model.begin_task(1, num_classes=2)
    report = model.capacity()
    assert report.new_head_keep == pytest.approx(model.keep_masks.head_keep)
    assert report.new_head_keep < 1.0
