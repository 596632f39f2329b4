"""Several model families and optimizers: MLP (AdamW), small CNN (shared head), tiny BERT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from edge_helpers import (
    SmallCNN,
    batches,
    export_copy,
    max_diff,
    mlp_model_after_two_tasks,
    mlp_multihead,
    numpy_batches,
    tiny_bert_after_one_task,
    torch_weights,
    train_torch,
)
from helpers import ENDS_UNTRAINED
from softmask_edge import (
    ArgumentError,
    BatchError,
    EdgeLearner,
    OnnxRuntimeError,
    SaveLocationError,
)

from softmask_peft import SoftMaskConfig, get_softmask_model


def test_adamw_steps_match_torch_adamw_with_grad_masking(tmp_path):
    model = mlp_model_after_two_tasks()
    artifacts = export_copy(model, tmp_path / "art", optimizer="adamw")
    data = batches(2)
    learner = EdgeLearner(artifacts)
    learner.learn_task(numpy_batches(data), epochs=2, lr=0.01)
    train_torch(model, 2, data, lr=0.01, epochs=2, optimizer="adamw", end=False)
    assert max_diff(learner.parameters(), torch_weights(model)) <= 1e-5


def test_optimizer_state_is_fresh_for_each_task(tmp_path):
    """Task 3 after task 2 in one session == task 3 started from the saved checkpoint."""
    model = mlp_model_after_two_tasks()
    artifacts = export_copy(model, tmp_path / "art", optimizer="adamw")
    learner = EdgeLearner(artifacts)
    learner.learn_task(numpy_batches(batches(2)), epochs=2, lr=0.01)
    learner.end_task(numpy_batches(batches(2)))
    learner.save()
    task3 = numpy_batches(batches(3, n=2))
    learner.learn_task(task3, lr=0.01)
    reloaded = EdgeLearner(artifacts)
    reloaded.learn_task(task3, lr=0.01)
    assert max_diff(learner.parameters(), reloaded.parameters()) == 0.0


def test_small_cnn_shared_head_matches_torch(tmp_path):
    torch.manual_seed(0)
    model = get_softmask_model(SmallCNN(), SoftMaskConfig(head_modules=["fc"]))
    shape = (1, 8, 8)
    train_torch(model, 0, batches(0, classes=3, shape=shape), classes=None)
    artifacts = export_copy(model, tmp_path / "art", example=torch.randn(2, *shape))
    learner = EdgeLearner(artifacts)
    assert learner.manifest.task_mode == "shared_head"
    assert learner.manifest.heads == ["fc.weight", "fc.bias"]
    data = batches(1, classes=3, shape=shape)
    losses = learner.learn_task(numpy_batches(data), epochs=4, lr=0.1)
    train_torch(model, 1, data, classes=None, lr=0.1, epochs=4, end=False)
    assert losses[-1] < losses[0]
    assert max_diff(learner.parameters(), torch_weights(model)) <= 1e-5
    assert max_diff(learner.end_task(numpy_batches(data)), model.end_task(data)) <= 1e-4


def test_heads_of_different_widths_are_padded(tmp_path):
    net = mlp_multihead()
    model = get_softmask_model(net, SoftMaskConfig())
    train_torch(model, 0, batches(0, classes=2))
    net.add_head(3)
    artifacts = export_copy(model, tmp_path / "art")
    learner = EdgeLearner(artifacts)
    assert learner.manifest.head_classes == [2, 3]
    data = batches(1, classes=3)
    learner.learn_task(numpy_batches(data), epochs=2, lr=0.1)
    train_torch(model, 1, data, classes=3, lr=0.1, epochs=2, end=False)
    assert max_diff(learner.parameters(), torch_weights(model)) <= 1e-5
    assert learner.predict(data[0][0].numpy(), task_id=0).shape == (8, 3)
    assert max_diff(learner.end_task(numpy_batches(data)), model.end_task(data)) <= 1e-4


def test_tiny_bert_learns_on_device_with_adamw(tmp_path):
    model, data, artifacts = tiny_bert_after_one_task(tmp_path / "art", optimizer="adamw")
    net = model.base_model
    example = {k: v for k, v in data[0].items() if k != "labels"}
    training = onnx.load(artifacts / "training_model.onnx")
    norms = [n for n in training.graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(len(n.output) == 3 for n in norms)
    learner = EdgeLearner(artifacts)
    device = [{k: v.numpy() for k, v in b.items()} for b in data]
    before = learner.parameters()
    losses = learner.learn_task(device, epochs=4, lr=0.01)
    assert losses[-1] < losses[0]
    after = learner.parameters()
    a = learner.importance()
    # elements the exported importance fully protects did not move; others did
    word = "bert.embeddings.word_embeddings.weight"
    assert set(a) == set(model.masked_parameter_names)
    frozen = np.isclose(a["bert.encoder.layer.0.output.dense.weight"], 1.0)
    moved = (
        after["bert.encoder.layer.0.output.dense.weight"]
        != before["bert.encoder.layer.0.output.dense.weight"]
    )
    assert not (frozen & moved).any()
    assert not np.array_equal(after["classifier.weight"], before["classifier.weight"])
    imp = learner.end_task(device)
    assert all(v.min() >= 0.0 and v.max() <= 1.0 for v in imp.values())
    assert imp[word].max() > 0.5
    # the device's eval graph and torch agree on the logits (dropout off in both)
    net.eval()
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(torch.from_numpy(learner.parameters()[n]))
        expected = net(**example).logits.numpy()
    got = learner.predict({k: v.numpy() for k, v in example.items()})
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_token_ids_outside_the_embedding_are_refused_before_any_step(tmp_path):
    """An id onnxruntime would fail on (or wrap around, if negative) mid-pass is a BatchError
    naming the input and the table size, raised before the first batch steps."""
    _, data, artifacts = tiny_bert_after_one_task(tmp_path / "art")
    learner = EdgeLearner(artifacts)
    device = [{k: v.numpy() for k, v in b.items()} for b in data]
    before = learner.parameters()
    for bad_id in (40, -1):  # vocab_size 40
        bad = {**device[-1], "input_ids": device[-1]["input_ids"].copy()}
        bad["input_ids"][0, 0] = bad_id
        with pytest.raises(
            BatchError, match=r"'input_ids' .* 40 rows, so ids must lie in \[0, 40\)"
        ):
            learner.learn_task([*device[:-1], bad], epochs=1, lr=0.1)
        with pytest.raises(BatchError, match="40 rows"):
            learner.end_task([bad])
    assert all(np.array_equal(v, before[n]) for n, v in learner.parameters().items())
    assert learner.num_tasks == 1
    learner.learn_task(device, epochs=1, lr=0.1)  # ids up to 39 pass


def test_a_pass_onnxruntime_refuses_midway_leaves_the_weights_where_it_started(tmp_path):
    """A batch longer than BERT's position table passes the batch checks and fails inside
    onnxruntime after earlier batches stepped: the weights go back, a save keeps them."""
    _, data, artifacts = tiny_bert_after_one_task(tmp_path / "art")  # 16 positions
    learner = EdgeLearner(artifacts)
    device = [{k: v.numpy() for k, v in b.items()} for b in data]
    long = {
        "input_ids": np.ones((4, 20), np.int64),
        "attention_mask": np.ones((4, 20), np.int64),
        "labels": np.zeros(4, np.int64),
    }
    before = learner.parameters()
    with pytest.raises(OnnxRuntimeError, match="learn_task"):
        learner.learn_task([*device, long], epochs=1, lr=0.1)
    assert all(np.array_equal(v, before[n]) for n, v in learner.parameters().items())
    learner.learn_task(device, epochs=1, lr=0.1)  # and the learner goes on
    assert not all(np.array_equal(v, before[n]) for n, v in learner.parameters().items())


def test_empty_batches_and_bad_evaluation_labels_are_batch_errors(mlp_case, tmp_path):
    """A 0-row batch made onnxruntime divide by zero (SIGFPE: the process died)."""
    _, artifacts = mlp_case
    learner = EdgeLearner(artifacts)
    x, y = numpy_batches(batches(2))[0]
    for call in (
        lambda: learner.learn_task([(x[:0], y[:0])]),
        lambda: learner.end_task([(x[:0], y[:0])]),
        lambda: learner.predict(x[:0], task_id=0),
        lambda: learner.evaluate([(x[:0], y[:0])], task_id=0),
    ):
        with pytest.raises(BatchError, match="at least one row"):
            call()
    with pytest.raises(BatchError, match=r"labels must have shape \(8,\)"):
        learner.evaluate([(x, y[:, None])], task_id=0)
    with pytest.raises(BatchError, match="integer class indices"):
        learner.evaluate([(x, np.array(["a"] * len(y)))], task_id=0)
    learner.learn_task(
        [(x, y)], epochs=np.int64(1), lr=np.float32(0.1)
    )  # numpy numbers are numbers
    with pytest.raises(ArgumentError):
        learner.learn_task([(x, y)], epochs=1, lr=True)


def test_export_inference_never_overwrites_the_artifacts(mlp_case, tmp_path):
    _, artifacts = mlp_case
    learner = EdgeLearner(artifacts)
    files = {p.name: p.read_bytes() for p in artifacts.iterdir()}
    for name in ("manifest.json", "eval_model.onnx", learner.manifest.checkpoint):
        with pytest.raises(SaveLocationError, match="would overwrite a file of the artifacts"):
            learner.export_inference(artifacts / name)
    assert {p.name: p.read_bytes() for p in artifacts.iterdir()} == files
    learner.export_inference(artifacts / "model.onnx")  # a new name in the folder is fine


@ENDS_UNTRAINED
def test_tiny_bert_importance_at_batch_4_matches_torch(tmp_path):
    """The position table broadcasts over the batch ([1, seq, H] + [batch, seq, H]). ONNX
    Runtime's gradient builder took the two symbolic shapes for equal and summed no batch axis:
    a wrong position-embedding gradient at batch >= 2 (and a hang or wasm trap in the browser).
    With measured shapes (softmask_edge.shapes) device and torch importance agree."""
    model, data, artifacts = tiny_bert_after_one_task(tmp_path / "art")
    assert data[0]["input_ids"].shape[0] == 4 and (data[0]["attention_mask"] == 0).any()
    learner = EdgeLearner(artifacts)
    device = learner.end_task([{k: v.numpy() for k, v in b.items()} for b in data])
    model.begin_task(1)
    expected = model.end_task(data)
    position = "bert.embeddings.position_embeddings.weight"
    assert np.abs(device[position] - expected[position].numpy()).max() <= 1e-4
    # a key bias adds the same q·b to every score of a softmax row: its gradient is 0 up to
    # rounding, so its standardized importance is noise on both sides; word-embedding rows of
    # tokens seen only at padded positions get gradients of rounding size too (<= 0.02 apart)
    noise = [n for n in device if n.endswith("attention.self.key.bias")]
    assert len(noise) == 2
    rest = [{n: v[n] for n in v if n not in noise} for v in (device, expected)]
    assert max_diff(*rest) <= 0.02
    word = "bert.embeddings.word_embeddings.weight"
    assert max_diff(*({n: v[n] for n in v if n != word} for v in rest)) <= 1e-4
