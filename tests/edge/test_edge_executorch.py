"""The ExecuTorch runtime against PyTorch: masked steps, importance, whole tasks, round trips.

Every expected value comes from torch (SoftMaskOptimizer, SoftMaskModel.end_task) or from a
closed form, never from the learner under test.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from edge_helpers import (
    IN_FEATURES,
    batches,
    export_copy,
    max_diff,
    numpy_batches,
    run_device_process,
    torch_weights,
    train_torch,
)
from helpers import ENDS_UNTRAINED
from softmask_edge import EdgeLearner, ExportError, read_device_checkpoint
from softmask_edge.importance import normalize

from softmask_peft import MultiHeadClassifier, SoftMaskConfig, SoftMaskOptimizer, get_softmask_model
from softmask_peft.device import export_for_device, load_device_checkpoint
from softmask_peft.errors import ConfigError
from softmask_peft.importance.normalize import normalize_importance

pytest.importorskip("executorch")


def test_the_folder_is_an_executorch_export_with_the_shared_manifest(executorch_case):
    model, artifacts = executorch_case
    raw = json.loads((artifacts / "manifest.json").read_text())
    assert "runtime" not in raw  # derived from the hashed files: the schema is unchanged
    assert sorted(raw["graphs_sha256"]) == [
        "eval_program.pte",
        "inference_program.pte",
        "training_program.ptd",
        "training_program.pte",
    ]
    assert EdgeLearner(artifacts).runtime == "executorch"
    # initial weights and importance, one masked step: test_edge_parity runs on both runtimes


def test_keep_zero_leaves_a_parameter_bit_identical(tmp_path):
    """A = 1 (keep = 0) on one tensor: many SGD steps leave it exactly as it was, and the rest
    learns as torch does. The harness's block shape (ReLU -> Dropout(p=0)), exported with the
    default XNNPACK delegation (it refused the pass-through node until the export dropped
    p = 0 dropout), from a one-row example (torch.export would fix the batch to 1)."""
    from edge_helpers import mlp_multihead

    net = mlp_multihead(relu_dropout0=True)
    model = get_softmask_model(net, SoftMaskConfig())
    model.begin_task(0, num_classes=2)
    frozen = "backbone.0.weight"
    model.store.close(
        {
            n: torch.ones_like(p) if n == frozen else torch.rand_like(p) * 0.5
            for n, p in net.named_parameters()
            if n in model.masked_parameter_names
        }
    )
    net.add_head(2)
    artifacts = export_copy(
        model, tmp_path / "et", runtime="executorch", example=torch.randn(1, IN_FEATURES)
    )
    assert b"XnnpackBackend" in (artifacts / "training_program.pte").read_bytes()
    learner = EdgeLearner(artifacts)
    before = learner.parameters()
    data = batches(3)
    learner.learn_task(numpy_batches(data), epochs=5, lr=0.5)
    after = learner.parameters()
    assert np.array_equal(after[frozen], before[frozen])
    assert not np.array_equal(after["backbone.2.weight"], before["backbone.2.weight"])
    train_torch(model, 1, data, lr=0.5, epochs=5, end=False)
    assert max_diff(after, torch_weights(model)) <= 1e-6
    assert max_diff(learner.end_task(numpy_batches(data)), model.end_task(data)) <= 1e-6


@ENDS_UNTRAINED
def test_the_importance_pass_alone_matches_torch(executorch_case):
    model, artifacts = executorch_case
    data = batches(5)
    learner = EdgeLearner(artifacts)
    model.begin_task(2, num_classes=2)
    torch_task = model.end_task(data)
    assert max_diff(learner.end_task(numpy_batches(data)), torch_task) <= 1e-6


def test_numpy_normalize_matches_softmask_peft():
    g = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32) * 3 + 1
    expected = normalize_importance(torch.from_numpy(g)).numpy()
    assert np.abs(normalize(g) - expected).max() <= 1e-6
    assert not normalize(np.ones(4, np.float32)).any()
    assert not normalize(np.ones(1, np.float32)).any()


def test_numpy_importance_update_applies_the_capacity_options_as_torch():
    """The ExecuTorch learner's numpy update: budget and sharpness as
    softmask_peft.capacity.shape_task_importance, decay on the old A, last head only
    without cross-heads."""
    from softmask_edge.importance import update_importance

    from softmask_peft.capacity import shape_task_importance

    rng = np.random.default_rng(1)
    heads = [rng.standard_normal((6, 4)).astype(np.float32) for _ in range(3)]
    stored = {"w": rng.uniform(0, 1, (6, 4)).astype(np.float32)}
    for cross_heads in (True, False):
        task, updated, mean = update_importance(
            {"w": heads}, stored, "float32", 2.0, 0.25, 0.5, cross_heads
        )
        used = heads if cross_heads else heads[-1:]
        gamma = torch.stack([normalize_importance(torch.from_numpy(g)) for g in used]).amax(0)
        expected = shape_task_importance({"w": gamma}, 2.0, 0.25)["w"].numpy()
        assert int((expected > 0).sum()) == 6  # ceil(0.25 * 24) values kept
        assert np.abs(task["w"] - expected).max() <= 1e-6
        assert np.abs(updated["w"] - np.maximum(0.5 * stored["w"], expected)).max() <= 1e-6
        assert abs(float(mean[0]) - float(updated["w"].mean())) <= 1e-6


def test_sgd_momentum_matches_torch(executorch_case):
    """The runtime's SGD with momentum equals torch.optim.SGD(momentum) behind grad masking."""
    model, artifacts = executorch_case
    data = batches(4)
    learner = EdgeLearner(artifacts, momentum=0.9)
    learner.learn_task(numpy_batches(data), epochs=2, lr=0.05)
    model.begin_task(2, num_classes=2)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SoftMaskOptimizer(torch.optim.SGD(params, lr=0.05, momentum=0.9), model, mask_mode="grad")
    for _ in range(2):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert max_diff(learner.parameters(), torch_weights(model)) <= 1e-6


@pytest.mark.onnx_runtime
def test_early_stopping_runs_the_same_on_both_runtimes(mlp_source, executorch_source, tmp_path):
    """Validation losses, lr decay and the best weights kept: ONNX Runtime and ExecuTorch agree."""
    from softmask_edge import EarlyStopping

    train, val = numpy_batches(batches(2)), numpy_batches(batches(9, n=2))
    options = EarlyStopping(patience=3, lr_patience=1)
    results = []
    for _, artifacts in (mlp_source, executorch_source):
        learner = EdgeLearner(artifacts)
        learner.learn_task(train, epochs=12, lr=2.0, validation=val, early_stopping=options)
        results.append((learner.validation_losses, learner.parameters()))
    (ort_losses, ort_weights), (et_losses, et_weights) = results
    assert len(ort_losses) == len(et_losses) < 12
    assert np.allclose(ort_losses, et_losses, atol=1e-5)
    assert max_diff(ort_weights, et_weights) <= 1e-5


def test_save_and_load_device_checkpoint_round_trip(executorch_case, tmp_path):
    model, artifacts = executorch_case
    data = batches(2)
    learner = EdgeLearner(artifacts)
    learner.learn_task(numpy_batches(data), epochs=2, lr=0.1)
    learner.end_task(numpy_batches(data), name="device task")
    learner.save()
    reloaded = EdgeLearner(artifacts)
    assert reloaded.manifest.generation == 1 and reloaded.num_tasks == 3
    assert max_diff(reloaded.parameters(), learner.parameters()) == 0.0
    assert max_diff(reloaded.importance(), learner.importance()) == 0.0
    assert read_device_checkpoint(artifacts).manifest.task_names[-1] == "device task"

    restored = load_device_checkpoint(copy.deepcopy(model), artifacts)
    assert restored.num_tasks == 3
    weights = {n: p.detach().numpy() for n, p in restored.base_model.named_parameters()}
    assert max_diff({n: weights[n] for n in learner.parameters()}, learner.parameters()) == 0.0
    assert max_diff(learner.importance(), restored.importance) == 0.0
    assert max_diff(learner.task_importance(2), restored.task_importance(2)) == 0.0


def test_adamw_and_unknown_runtimes_are_refused(tmp_path):
    from edge_helpers import mlp_model_after_two_tasks

    model = mlp_model_after_two_tasks()
    x = torch.randn(3, IN_FEATURES)
    with pytest.raises(ConfigError, match="ExecuTorch runtime's optimizer is SGD"):
        export_for_device(model, x, tmp_path / "a", runtime="executorch", optimizer="adamw")
    with pytest.raises(ConfigError, match="runtime must be"):
        export_for_device(model, x, tmp_path / "b", runtime="tflite")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.onnx_runtime
def test_momentum_on_onnx_artifacts_and_out_of_range_is_refused(mlp_case, executorch_source):
    from softmask_edge import ArgumentError

    _, artifacts = mlp_case
    with pytest.raises(ArgumentError, match="momentum is an ExecuTorch learner option"):
        EdgeLearner(artifacts, momentum=0.9)
    with pytest.raises(ArgumentError, match=r"momentum must be a number in \[0, 1\)"):
        EdgeLearner(executorch_source[1], momentum=1.5)


def test_a_batch_above_max_batch_is_refused_before_any_step(executorch_case):
    from softmask_edge import BatchError

    _, artifacts = executorch_case
    learner = EdgeLearner(artifacts)
    before = learner.parameters()
    big = (np.zeros((300, IN_FEATURES), np.float32), np.zeros(300, np.int64))
    small = numpy_batches(batches(2, n=1))[0]
    with pytest.raises(BatchError, match="at most 256 rows"):
        learner.learn_task([small, big])
    assert max_diff(learner.parameters(), before) == 0.0


def test_executorch_builder_refuses_missing_programs(tmp_path):
    from softmask_edge.executorch_builder import build_executorch_artifacts

    with pytest.raises(ExportError, match="needs exactly"):
        build_executorch_artifacts(
            tmp_path,
            programs={"training_program.pte": b""},
            weights={"w": np.zeros(2, np.float32)},
            trainable=["w"],
            masked=["w"],
            heads=[],
            head_classes=[2],
            task_mode="shared_head",
            inputs=[],
            importance={"w": np.zeros(2, np.float32)},
        )


def test_export_inference_writes_a_program_and_its_weights(executorch_case, tmp_path):
    """The .pte + .ptd pair gives the logits torch computes with the learned weights."""
    from executorch.extension.pybindings.portable_lib import _load_for_executorch
    from softmask_edge import SaveLocationError

    model, artifacts = executorch_case
    learner = EdgeLearner(artifacts)
    data = numpy_batches(batches(2))
    learner.learn_task(data, epochs=2, lr=0.1)
    path = learner.export_inference(tmp_path / "model.pte")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["model.ptd", "model.pte"]
    program = _load_for_executorch(str(path), str(path.with_suffix(".ptd")))
    x = torch.from_numpy(data[0][0])
    logits = program.run_method("forward", (x, torch.tensor(2)))[0]
    net = copy.deepcopy(model.base_model)
    net.load_state_dict({n: torch.from_numpy(w) for n, w in learner.parameters().items()})
    with torch.no_grad():
        expected = net(x, task_id=2)
    assert float((logits[:, :2] - expected).abs().max()) <= 1e-6
    assert np.abs(learner.predict(data[0][0], task_id=2)[:, :2] - expected.numpy()).max() <= 1e-6
    with pytest.raises(SaveLocationError, match="would overwrite"):
        learner.export_inference(artifacts / "training_program.pte")
    with pytest.raises(SaveLocationError, match="would overwrite"):
        learner.export_inference(artifacts / "training_program.bin")  # its .ptd is taken


class _ConvNet(torch.nn.Module):
    """conv -> relu -> flatten -> linear head `fc` (no pooling: see the next test)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.fc = torch.nn.Linear(2 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).flatten(1))


def test_a_shared_head_conv_net_trains_and_exports_inference(tmp_path):
    """Domain-incremental (no task input): a conv layer and a shared head, against torch."""
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    torch.manual_seed(0)
    model = get_softmask_model(_ConvNet(), SoftMaskConfig(head_modules=["fc"]))
    data = batches(4, n=3, classes=3, shape=(1, 8, 8))
    train_torch(model, 0, data, classes=None)
    artifacts = export_copy(
        model, tmp_path / "conv", runtime="executorch", example=torch.randn(2, 1, 8, 8)
    )
    learner = EdgeLearner(artifacts)
    learner.learn_task(numpy_batches(data), epochs=2, lr=0.1)
    train_torch(model, 1, data, classes=None, epochs=2, end=False)
    assert max_diff(learner.parameters(), torch_weights(model)) <= 1e-6
    assert max_diff(learner.end_task(numpy_batches(data)), model.end_task(data)) <= 1e-6
    path = learner.export_inference(tmp_path / "conv.pte")
    program = _load_for_executorch(str(path), str(path.with_suffix(".ptd")))
    x = data[0][0]
    with torch.no_grad():
        expected = model(x)
    assert float((program.run_method("forward", (x,))[0] - expected).abs().max()) <= 1e-5


def test_pooling_is_refused_since_its_executorch_backward_is_wrong(tmp_path):
    from edge_helpers import SmallCNN

    model = get_softmask_model(SmallCNN(), SoftMaskConfig(head_modules=["fc"]))
    with pytest.raises(ConfigError, match="max_pool2d_with_indices_backward"):
        export_for_device(model, torch.randn(2, 1, 8, 8), tmp_path / "a", runtime="executorch")
    assert not (tmp_path / "a").exists()


ET_DEVICE_SCRIPT = """
import sys
sys.modules["onnx"] = None  # no ONNX, no ONNX Runtime: a Python 3.13 device
sys.modules["onnxruntime"] = None
import json
import numpy as np
from softmask_edge import EdgeLearner, read_device_checkpoint

artifacts, data = sys.argv[1], json.loads(sys.argv[2])
batches = [(np.asarray(x, np.float32), np.asarray(y, np.int64)) for x, y in data]
learner = EdgeLearner(artifacts)
losses = learner.learn_task(batches, epochs=3, lr=0.1)
learner.end_task(batches)
learner.save(artifacts)
learner.export_inference(artifacts + "/model.pte")
print(json.dumps({"losses": losses, "num_tasks": read_device_checkpoint(artifacts).manifest.num_tasks}))
"""


def test_the_executorch_device_cycle_needs_neither_onnx_nor_onnxruntime(executorch_case):
    _, artifacts = executorch_case
    result = run_device_process(ET_DEVICE_SCRIPT, artifacts, numpy_batches(batches(2)))
    assert result["num_tasks"] == 3
    assert result["losses"][-1] < result["losses"][0]
    assert (artifacts / "model.pte").is_file() and (artifacts / "model.ptd").is_file()


def test_a_model_torch_export_cannot_trace_is_a_config_error(tmp_path):
    """Data-dependent control flow: torch.export refuses; the library names it."""

    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(IN_FEATURES, 4)

        def forward(self, x):
            h = self.fc(x)
            return h if float(h.sum()) > 0 else -h  # a Python branch on a tensor value

    model = get_softmask_model(MultiHeadClassifier(Branchy(), 4), SoftMaskConfig())
    model.begin_task(0, num_classes=2)
    x, y = torch.randn(8, IN_FEATURES), torch.randint(0, 2, (8,))
    model.end_task([(x, y)])
    with pytest.raises(ConfigError, match="torch.export could not trace"):
        export_for_device(
            model, torch.randn(3, IN_FEATURES), tmp_path / "a", runtime="executorch", future_heads=[2]
        )
    assert not (tmp_path / "a").exists()
