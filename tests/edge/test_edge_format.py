"""Format 2 (what onnxruntime-web needs), the 0.1.0 artifacts (format 1) still loading, and
format 4: artifacts whose broadcast gradients ONNX Runtime built on guessed shapes are refused."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from edge_helpers import (
    SmallCNN,
    batches,
    export_before_format_4,
    export_copy,
    max_diff,
    mlp_model_after_two_tasks,
    numpy_batches,
    read_manifest,
    tiny_bert_after_one_task,
    train_torch,
    write_manifest,
)
from onnx import numpy_helper
from softmask_edge import EdgeLearner, UnsupportedFormatError, read_device_checkpoint
from softmask_edge.session_graphs import guessed_broadcasts, wrong_broadcasts

from softmask_peft import SoftMaskConfig, get_softmask_model

FIXTURE = Path(__file__).parents[1] / "fixtures" / "v0_1_0" / "edge_mlp"


def _one_step_deltas(artifacts: Path, tmp: Path, data) -> dict[float, dict]:
    """Weight change of one masked SGD step at two learning rates, each from a fresh copy."""
    out = {}
    for lr in (0.1, 0.5):
        copy = tmp / f"lr{lr}"
        shutil.copytree(artifacts, copy)
        learner = EdgeLearner(copy)
        before = learner.parameters()
        learner.learn_task(data[:1], epochs=1, lr=lr)
        out[lr] = {n: v - before[n] for n, v in learner.parameters().items()}
    return out


def _steps_scale_with_lr(deltas: dict[float, dict]) -> None:
    moved = {n: d for n, d in deltas[0.1].items() if np.abs(d).max() > 1e-6}
    assert moved
    for n, d in moved.items():
        np.testing.assert_allclose(deltas[0.5][n], 5.0 * d, rtol=1e-4, atol=1e-7)


def test_format_1_artifacts_of_release_0_1_0_learn_and_save(tmp_path):
    data = [
        (np.random.default_rng(s).normal(size=(8, 4)).astype(np.float32), np.arange(8) % 2)
        for s in range(2)
    ]
    _steps_scale_with_lr(_one_step_deltas(FIXTURE, tmp_path, data))
    artifacts = tmp_path / "learned"
    shutil.copytree(FIXTURE, artifacts)
    learner = EdgeLearner(artifacts)
    assert learner.manifest.format_version == 1 and learner.num_tasks == 1
    learner.learn_task(data, epochs=2, lr=0.1)
    learner.end_task(data)
    learner.save()
    back = read_device_checkpoint(artifacts)
    assert back.manifest.format_version == 1 and back.manifest.num_tasks == 2
    assert max_diff(back.weights, learner.parameters()) == 0.0


def test_format_2_records_what_other_runtimes_need(mlp_case, tmp_path):
    _, artifacts = mlp_case
    learner = EdgeLearner(artifacts)
    m = learner.manifest
    assert m.format_version == 4 and m.learning_rate == 0.05
    training = onnx.load(artifacts / "training_model.onnx")
    stored = [*m.params, *(n + ".softmask_importance" for n in m.masked)]
    stored.append("softmask.mean_importance")
    graph_order = [i.name for i in training.graph.input if i.name in stored]
    assert m.parameter_order == graph_order and sorted(graph_order) == sorted(stored)
    assert m.parameter_order != sorted(m.parameter_order)  # the sorted manifest keys differ
    outputs = [o.name for o in training.graph.output]
    assert [f"{n}.softmask_gradient" for n in m.parameter_order if n in m.params] == [
        o for o in outputs if o.endswith(".softmask_gradient")
    ]
    optimizer = onnx.load(artifacts / "optimizer_model.onnx")
    (node,) = optimizer.graph.node
    assert node.op_type == "SGDOptimizerV2" and node.input[0] == "softmask.learning_rate"
    lr = {i.name: numpy_helper.to_array(i) for i in optimizer.graph.initializer}
    np.testing.assert_array_equal(lr["softmask.learning_rate"], np.array([0.05], np.float32))
    flag = next(o for o in optimizer.graph.output if o.name == node.output[0])
    assert len(flag.type.tensor_type.shape.dim) == 0 and flag.type.tensor_type.HasField("shape")
    _steps_scale_with_lr(_one_step_deltas(artifacts, tmp_path, numpy_batches(batches(2))))


def test_gradient_outputs_are_the_accumulated_gradients(mlp_case):
    """The exposed outputs equal the gradient buffers the Python learner reads from the state."""
    from softmask_edge import _ort

    _, artifacts = mlp_case
    learner = EdgeLearner(artifacts)
    session = learner._runtime._session
    session.specialize(learner._runtime._constants(session.state, 1.0), gradient_outputs=True)
    data = numpy_batches(batches(2, n=2))
    session.reset_gradients()
    for batch in data:
        outputs = session.run(learner._feeds(batch, 2, cross_head=False), training=True)
    names = [o.name for o in onnx.load(artifacts / "training_model.onnx").graph.output]
    # ORT's Module returns the graph outputs except the accumulators' flags
    fetched = dict(zip([n for n in names if not n.endswith("_grad.accumulation.out")], outputs))
    assert len(fetched) == len(outputs) == 2 + len(learner.manifest.params)
    for n in learner.manifest.params:
        state = _ort.get_gradient(session.state, n)
        np.testing.assert_array_equal(fetched[n + ".softmask_gradient"], state)
    assert np.abs(fetched["backbone.0.weight.softmask_gradient"]).max() > 0


POSITION = "bert.embeddings.position_embeddings.weight"


def _guesses(folder: Path) -> tuple[list[str], list[str]]:
    """(guessed, wrong) node names of an artifacts folder (`session_graphs`)."""
    guessed = guessed_broadcasts(onnx.load(folder / "training_model.onnx"))
    wrong = wrong_broadcasts(onnx.load(folder / "eval_model.onnx"), guessed)
    return [g.node for g in guessed], wrong


def _device_and_torch_importance(model, data, folder: Path) -> tuple[dict, dict]:
    """Task 1's importance on `data` (batch 4, padded rows) by the learner and by torch."""
    device = EdgeLearner(folder).end_task([{k: v.numpy() for k, v in b.items()} for b in data])
    model.begin_task(1)
    return device, {n: v.numpy() for n, v in model.end_task(data).items()}


@pytest.mark.filterwarnings("ignore:task 1 ended without a single soft-masked optimizer step")
def test_transformer_artifacts_from_before_format_4_are_refused_untouched(monkeypatch, tmp_path):
    """A tiny BERT exported the old way (no measured shapes) is refused by name; its files stay
    as they were. The one wrong guess is the word + position embedding add, and it was wrong:
    forced past the format gate, the position-table importance at batch 4 is far from torch's,
    where the format 4 export of the same model agrees."""
    model, data, new = tiny_bert_after_one_task(tmp_path / "new")
    example = {k: v for k, v in data[0].items() if k != "labels"}
    old = export_before_format_4(monkeypatch, model, tmp_path / "old", example=example)
    files = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(UnsupportedFormatError, match="export the model again with this release"):
        EdgeLearner(old)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == files
    guessed, wrong = _guesses(old)
    # residual adds and the attention-mask add were guessed right (equal sizes, or no gradient)
    assert len(guessed) == 6 and wrong == ["/net/bert/embeddings/Add_1"]
    assert _guesses(new) == ([], []) and read_manifest(new)["format_version"] == 4

    write_manifest(old, {**read_manifest(old), "format_version": 4})  # past the gate
    wrong_device, expected = _device_and_torch_importance(model, data, old)
    right_device = EdgeLearner(new).end_task([{k: v.numpy() for k, v in b.items()} for b in data])
    assert np.abs(right_device[POSITION] - expected[POSITION]).max() <= 1e-4
    assert np.abs(wrong_device[POSITION] - expected[POSITION]).max() > 0.1


@pytest.mark.filterwarnings("ignore:task 1 ended without a single soft-masked optimizer step")
def test_transformer_artifacts_from_before_format_4_whose_guesses_were_right_load(
    monkeypatch, tmp_path
):
    """A tiny RoBERTa (position ids per token: [batch, seq], nothing broadcast over the batch)
    exported the old way has guessed broadcasts, all right: it loads, and its importance at
    batch 4 matches torch's as the format 4 BERT's does."""
    old_export = functools.partial(export_before_format_4, monkeypatch)
    model, data, old = tiny_bert_after_one_task(tmp_path / "old", old_export, roberta=True)
    guessed, wrong = _guesses(old)
    assert guessed and wrong == []
    device, expected = _device_and_torch_importance(model, data, old)
    # key biases: gradient 0 up to rounding (see test_tiny_bert_importance_at_batch_4_matches_torch)
    noise = [n for n in device if n.endswith("attention.self.key.bias")]
    assert len(noise) == 2
    assert max_diff(*({n: v[n] for n in v if n not in noise} for v in (device, expected))) <= 1e-3


def test_mlp_and_cnn_artifacts_from_before_format_4_still_load_and_learn(monkeypatch, tmp_path):
    """Without a broadcast on guessed shapes the old graphs were right: an MLP exported the old
    way learns exactly as its format 4 export, saves as format 3 and loads back; a CNN loads."""
    model = mlp_model_after_two_tasks()
    old = export_before_format_4(monkeypatch, model, tmp_path / "old")
    new = export_copy(model, tmp_path / "new")
    data = numpy_batches(batches(2))
    learners = [EdgeLearner(old), EdgeLearner(new)]
    assert [x.manifest.format_version for x in learners] == [3, 4]
    importance = []
    for learner in learners:
        learner.learn_task(data, epochs=2, lr=0.1)
        importance.append(learner.end_task(data))
    assert max_diff(learners[0].parameters(), learners[1].parameters()) <= 1e-6
    assert max_diff(*importance) <= 1e-5
    learners[0].save()
    back = EdgeLearner(old)
    assert back.manifest.format_version == 3 and back.num_tasks == 3

    torch.manual_seed(0)
    cnn = get_softmask_model(SmallCNN(), SoftMaskConfig(head_modules=["fc"]))
    shape = (1, 8, 8)
    train_torch(cnn, 0, batches(0, classes=3, shape=shape), classes=None)
    folder = export_before_format_4(
        monkeypatch, cnn, tmp_path / "cnn", example=torch.randn(2, *shape)
    )
    assert EdgeLearner(folder).manifest.format_version == 3
