"""Importance stored as float32, float16 or uint8 in the device checkpoint (cast in the graphs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from edge_helpers import batches, export_copy, mlp_model_after_two_tasks, numpy_batches, train_torch
from helpers import UINT8_A_TOL
from softmask_edge import EdgeLearner, UnsupportedFormatError, read_device_checkpoint
from softmask_edge._ort import get_parameter, load_checkpoint

from softmask_peft.persistence import encode


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_compact_importance_round_trips_and_updates_on_device(tmp_path, dtype):
    model = mlp_model_after_two_tasks(importance_dtype=dtype)
    artifacts = export_copy(model, tmp_path / "art")
    learner = EdgeLearner(artifacts)
    state = load_checkpoint(artifacts / learner.manifest.checkpoint)
    stored = get_parameter(state, "backbone.0.weight.softmask_importance")
    a = model.importance["backbone.0.weight"].numpy()
    if dtype == "uint8":  # the log-keep code of the torch side, keep within 2^(1/32) − 1
        np.testing.assert_array_equal(stored, encode(model.importance["backbone.0.weight"], dtype))
        tolerance = UINT8_A_TOL
    else:  # the float16 bit pattern, carried as uint16
        np.testing.assert_array_equal(stored, a.astype(np.float16).view(np.uint16))
        tolerance = 1e-3
    data = batches(2)
    learner.learn_task(numpy_batches(data), lr=0.1)
    learner.end_task(numpy_batches(data))
    learner.save()
    train_torch(model, 2, data, lr=0.1)
    device = read_device_checkpoint(artifacts)
    for name, value in model.importance.items():
        assert np.abs(device.importance[name] - value.numpy()).max() <= tolerance
        assert (
            np.abs(device.history[2][name] - model.task_importance(2)[name].numpy()).max()
            <= tolerance
        )
    state = load_checkpoint(artifacts / device.manifest.checkpoint)
    a = np.concatenate([v.ravel() for v in device.importance.values()]).astype(np.float64)
    np.testing.assert_allclose(
        get_parameter(state, "softmask.mean_importance"), [a.mean()], rtol=1e-6
    )
    stored = get_parameter(state, "backbone.0.weight.softmask_importance")
    assert stored.dtype == (np.uint8 if dtype == "uint8" else np.uint16)


def test_uint8_checkpoint_is_smaller(tmp_path):
    sizes = {}
    for dtype in ("float32", "uint8"):
        torch.manual_seed(0)
        model = mlp_model_after_two_tasks(importance_dtype=dtype)
        artifacts = export_copy(model, tmp_path / dtype)
        learner = EdgeLearner(artifacts)
        sizes[dtype] = (artifacts / learner.manifest.checkpoint).stat().st_size
    masked = sum(
        int(np.prod(s)) for n, s in learner.manifest.params.items() if n in learner.manifest.masked
    )
    assert sizes["float32"] - sizes["uint8"] >= 3 * masked


def test_device_artifacts_of_format_2_are_refused_not_misread(tmp_path):
    """Format 2 stored uint8 as round(255 · A); read as log-keep codes every A would change,
    so the manifest's version refuses them (export again from the torch checkpoint)."""
    model = mlp_model_after_two_tasks(importance_dtype="uint8")
    artifacts = export_copy(model, tmp_path / "art")
    manifest = artifacts / "manifest.json"
    raw = json.loads(manifest.read_text())
    assert raw["format_version"] == 4 and raw["importance_dtype"] == "uint8"
    manifest.write_text(json.dumps({**raw, "format_version": 2}))
    with pytest.raises(UnsupportedFormatError, match="format 2 stores uint8 importance on the old linear code"):
        EdgeLearner(artifacts)
    with pytest.raises(UnsupportedFormatError, match="format 2 stores uint8 importance on the old linear code"):
        read_device_checkpoint(artifacts)
