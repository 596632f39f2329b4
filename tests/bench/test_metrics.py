"""Metrics against hand-computed values on hand-made accuracy matrices."""

from __future__ import annotations

import math

import pytest
from softmask_bench.metrics import (
    average_accuracy,
    backward_transfer,
    compute_metrics,
    forgetting,
    mean_std,
    plasticity,
)

from softmask_peft.errors import ConfigError

NAN = float("nan")
# Task 0 peaks after task 1 (80), so Forgetting (max over rows) differs from -BWT (diagonal).
R = [
    [50.0, NAN, NAN],
    [80.0, 90.0, NAN],
    [60.0, 70.0, 95.0],
]


def test_acc_is_mean_of_last_row() -> None:
    assert average_accuracy(R) == pytest.approx((60 + 70 + 95) / 3)


def test_bwt_uses_the_diagonal() -> None:
    # ((60 - 50) + (70 - 90)) / 2
    assert backward_transfer(R) == pytest.approx(-5.0)


def test_forgetting_uses_the_best_earlier_row() -> None:
    # task 0: max(50, 80) - 60 = 20; task 1: 90 - 70 = 20
    assert forgetting(R) == pytest.approx(20.0)


def test_plasticity_is_the_mean_of_the_diagonal() -> None:
    # (50 + 90 + 95) / 3: each task right after learning it, whatever happened later
    assert plasticity(R) == pytest.approx(235.0 / 3)
    assert plasticity([[90.0, 80.0]]) is None


def test_no_forgetting_when_accuracy_only_rises() -> None:
    r = [[70.0, NAN], [75.0, 90.0]]
    assert forgetting(r) == pytest.approx(-5.0)
    assert backward_transfer(r) == pytest.approx(5.0)


def test_none_entries_count_as_unlearned() -> None:
    r = [[50.0, None, None], [80.0, 90.0, None], [60.0, 70.0, 95.0]]
    assert compute_metrics(r) == pytest.approx(compute_metrics(R))


def test_final_row_only_and_single_task_have_no_bwt_or_forgetting() -> None:
    assert compute_metrics([[90.0, 80.0]]) == {
        "acc": 85.0,
        "bwt": None,
        "forgetting": None,
        "plasticity": None,
    }
    assert compute_metrics([[42.0]]) == {
        "acc": 42.0,
        "bwt": None,
        "forgetting": None,
        "plasticity": 42.0,
    }


@pytest.mark.parametrize("bad", [[1.0, 2.0], [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [[]]])
def test_bad_shapes_raise(bad) -> None:
    with pytest.raises(ConfigError, match="accuracy matrix"):
        average_accuracy(bad)


def test_mean_std_uses_sample_std() -> None:
    mean, std = mean_std([1.0, 2.0, 6.0])
    assert mean == pytest.approx(3.0)
    assert std == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))
    assert mean_std([5.0]) == (5.0, 0.0)
    assert mean_std([1.0, None]) is None
