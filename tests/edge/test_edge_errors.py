"""Bad input gives a clear error and damages nothing; saves survive a crash mid-write."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import softmask_edge.learner as learner_module
from edge_helpers import batches, device_script, export_copy, max_diff, numpy_batches
from softmask_edge import (
    ArtifactMismatchError,
    BatchError,
    CorruptArtifactError,
    EdgeLearner,
    EmptyDataError,
    MissingArtifactError,
    TaskOrderError,
    UnsupportedFormatError,
)

X, Y = numpy_batches(batches(2, n=1))[0]


def _manifest(artifacts):
    return json.loads((artifacts / "manifest.json").read_text())


def test_missing_directory_and_missing_files(mlp_case, tmp_path):
    _, artifacts = mlp_case
    with pytest.raises(MissingArtifactError, match="does not exist"):
        EdgeLearner(tmp_path / "nowhere")
    (artifacts / "importance_update.onnx").unlink()
    with pytest.raises(MissingArtifactError, match="importance_update.onnx"):
        EdgeLearner(artifacts)
    (artifacts / "manifest.json").unlink()
    with pytest.raises(MissingArtifactError, match="manifest.json"):
        EdgeLearner(artifacts)


def test_corrupted_checkpoint_is_detected_before_onnxruntime_reads_it(device_case):
    _, artifacts = device_case
    ckpt = artifacts / _manifest(artifacts)["checkpoint"]
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="SHA-256"):
        EdgeLearner(artifacts)


def test_bad_manifest(device_case):
    _, artifacts = device_case
    raw = _manifest(artifacts)
    (artifacts / "manifest.json").write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(UnsupportedFormatError, match="format_version 99"):
        EdgeLearner(artifacts)
    (artifacts / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptArtifactError, match="cannot parse"):
        EdgeLearner(artifacts)


def test_checkpoint_of_another_model_is_refused(mlp_source, tmp_path):
    """Another model's checkpoint (with a consistent checksum) does not fit this manifest: it is
    too small for the manifest's shapes, which is checked before onnxruntime reads it."""
    import torch
    from edge_helpers import SmallCNN

    from softmask_peft import SoftMaskConfig, get_softmask_model

    model, artifacts = mlp_source
    mine = tmp_path / "mine"
    shutil.copytree(artifacts, mine)
    torch.manual_seed(0)
    cnn = get_softmask_model(SmallCNN(), SoftMaskConfig(head_modules=["fc"]))
    other = export_copy(cnn, tmp_path / "other", example=torch.randn(2, 1, 8, 8))
    raw, foreign = _manifest(mine), _manifest(other)
    shutil.copy(other / foreign["checkpoint"], mine / raw["checkpoint"])
    raw["checkpoint_sha256"] = foreign["checkpoint_sha256"]
    (mine / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactMismatchError, match="more than checkpoint-000000 holds"):
        EdgeLearner(mine)


def test_bad_batches_raise_and_change_nothing(device_case):
    _, artifacts = device_case
    learner = EdgeLearner(artifacts)
    before = learner.parameters()
    bad = [
        ((X.astype(np.float64), Y), "dtype float64"),
        ((X[:, :4], Y), r"shape \[8, 4\] does not match \['\?', 6\]"),
        ((X, Y[:5]), r"labels must have shape \(8,\)"),
        ((X, Y + 5), r"labels must lie in \[0, 2\)"),
        ((X, Y.astype(np.float32)), "integer class indices"),
        (({"wrong": X}, Y), r"missing \['input'\]"),
        ((X,), "a batch must be"),
        ({"input": X}, "'labels' entry"),
    ]
    for batch, message in bad:
        with pytest.raises(BatchError, match=message):
            learner.learn_task([(X, Y), batch])
    with pytest.raises(EmptyDataError):
        learner.learn_task([])
    with pytest.raises(EmptyDataError):
        learner.end_task(iter([]))
    with pytest.raises(TaskOrderError, match="the next task is 2"):
        learner.learn_task([(X, Y)], task_id=5)
    assert max_diff(learner.parameters(), before) == 0.0
    assert learner.num_tasks == 2


def test_declared_heads_run_out(device_case):
    _, artifacts = device_case
    learner = EdgeLearner(artifacts)
    for _ in range(2):  # heads 2 and 3 were declared
        learner.learn_task([(X, Y)])
        learner.end_task([(X, Y)])
    with pytest.raises(TaskOrderError, match="declare more heads"):
        learner.learn_task([(X, Y)])


def test_exception_during_save_keeps_the_previous_checkpoint(device_case, monkeypatch):
    _, artifacts = device_case
    learner = EdgeLearner(artifacts)
    learner.learn_task([(X, Y)], lr=0.5)
    learner.end_task([(X, Y)])
    trained = learner.parameters()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(learner_module, "write_history", fail)
    with pytest.raises(OSError, match="disk full"):
        learner.save()
    reloaded = EdgeLearner(artifacts)
    assert reloaded.num_tasks == 2
    assert max_diff(reloaded.parameters(), trained) > 0
    monkeypatch.undo()
    learner.save()
    reloaded = EdgeLearner(artifacts)
    assert reloaded.num_tasks == 3
    assert max_diff(reloaded.parameters(), trained) == 0.0
    assert not [p for p in os.listdir(artifacts) if p.endswith(".tmp")]


def test_process_killed_mid_save_leaves_a_loadable_checkpoint(mlp_case):
    """SIGKILL after the new checkpoint file is written but before the manifest switches."""
    _, artifacts = mlp_case
    then = """
        import os, signal
        import softmask_edge.learner as m
        def killed(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        m.write_history = killed
        learner.save()
        """
    script = device_script(artifacts, X, Y, then)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert "checkpoint-000001" in os.listdir(artifacts)  # the half-finished generation
    learner = EdgeLearner(artifacts)
    assert learner.num_tasks == 2 and learner.manifest.generation == 0
    learner.learn_task([(X, Y)])
    learner.end_task([(X, Y)])
    learner.save()
    names = os.listdir(artifacts)
    assert "checkpoint-000000" not in names and EdgeLearner(artifacts).num_tasks == 3


@pytest.mark.onnx_runtime
def test_causal_lm_is_refused_at_export_time(tmp_path):
    """Token-level LM training is not a device loss: a clear ExportError, no artifacts."""
    import torch
    from helpers import tiny_gpt2
    from softmask_edge import ExportError

    from softmask_peft import SoftMaskConfig, get_softmask_model
    from softmask_peft.device import export_for_device

    model = get_softmask_model(tiny_gpt2(), SoftMaskConfig(head_modules=["lm_head"]))
    example = {"input_ids": torch.randint(0, 40, (2, 8))}
    with pytest.raises(ExportError, match=r"\(batch, sequence, vocab\).*AutoModelForSequence"):
        export_for_device(model, example, tmp_path / "art")
    assert not (tmp_path / "art" / "manifest.json").exists()
