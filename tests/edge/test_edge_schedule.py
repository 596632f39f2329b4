"""Validation split on the device: lr decay on plateaus, early stopping, best weights kept."""

from __future__ import annotations

import numpy as np
import pytest
from edge_helpers import batches, numpy_batches
from softmask_edge import EarlyStopping, EdgeLearner, EmptyDataError
from softmask_edge.schedule import Plateau


def test_plateau_decays_the_lr_then_stops():
    p = Plateau(EarlyStopping(patience=4, lr_patience=2, lr_factor=0.5, lr_min=1e-4), 0.1)
    steps = [p.update(v) for v in (1.0, 0.9, 0.95, 0.95, 0.8, 0.85, float("nan"), 0.9, 0.9)]
    assert [s[0] for s in steps] == [True, True, False, False, True, False, False, False, False]
    assert [s[1] for s in steps] == [False] * 8 + [True]  # 4 epochs without improvement
    assert p.lr == pytest.approx(0.1 * 0.5**3) and p.best == 0.8
    low = Plateau(EarlyStopping(patience=50, lr_patience=1, lr_factor=0.1, lr_min=1e-3), 0.05)
    assert [low.update(1.0)[1], low.update(1.0)[1], low.update(1.0)[1]] == [False, False, True]
    with pytest.raises(ValueError, match="lr_factor"):
        EarlyStopping(lr_factor=1.0)


def _val_loss(learner: EdgeLearner, data, task: int) -> float:
    feeds = [learner._feeds(b, task, cross_head=False) for b in data]
    return float(np.mean([learner._runtime.eval_step(f)[0] for f in feeds]))


def test_best_validation_weights_are_kept_and_training_stops_early(mlp_case):
    _, artifacts = mlp_case
    train, val = numpy_batches(batches(2, n=3)), numpy_batches(batches(12, n=2))
    learner = EdgeLearner(artifacts)
    options = EarlyStopping(patience=3, lr_patience=1, lr_factor=0.5)
    losses = learner.learn_task(train, epochs=40, lr=3.0, validation=val, early_stopping=options)
    curve = learner.validation_losses
    assert len(curve) == len(losses) < 40
    best = int(np.argmin(curve))
    assert best < len(curve) - 1  # the last epochs were worse: the kept weights are older
    assert _val_loss(learner, val, 2) == pytest.approx(curve[best], rel=1e-6)
    with pytest.raises(EmptyDataError, match="validation"):
        EdgeLearner(artifacts).learn_task(train, validation=[])
