"""Tiny models, data and torch-side training shared by the edge tests (built in-process)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import text_batches, tiny_bert
from softmask_edge.manifest import STATIC_FILES, sha256
from torch import Tensor, nn

from softmask_peft import SoftMaskConfig, SoftMaskModel, SoftMaskOptimizer, get_softmask_model
from softmask_peft.device import export_for_device
from softmask_peft.heads import MultiHeadClassifier

IN_FEATURES = 6


def batches(
    seed: int, n: int = 4, size: int = 8, classes: int = 2, shape: tuple[int, ...] = (IN_FEATURES,)
) -> list[tuple[Tensor, Tensor]]:
    """Gaussian inputs whose label depends on the inputs (so there is something to learn)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, *shape, generator=g)
        y = (x.flatten(1)[:, :classes].argmax(dim=1) + seed) % classes
        out.append((x, y))
    return out


def numpy_batches(data: list[tuple[Tensor, Tensor]]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in data]


def mlp_multihead(seed: int = 0, relu_dropout0: bool = False) -> MultiHeadClassifier:
    """Dropout-free MLP backbone (the SPG pass runs in train mode; parity needs no dropout).
    `relu_dropout0`: ReLU -> Dropout(p=0) blocks instead of tanh (the harness's MLP shape)."""
    torch.manual_seed(seed)
    act = (lambda: nn.Sequential(nn.ReLU(), nn.Dropout(0.0))) if relu_dropout0 else nn.Tanh
    backbone = nn.Sequential(nn.Linear(IN_FEATURES, 16), act(), nn.Linear(16, 8), act())
    return MultiHeadClassifier(backbone, 8)


class SmallCNN(nn.Module):
    """conv -> relu -> maxpool -> linear head (`fc`), on 1x8x8 images."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


def train_torch(
    model: SoftMaskModel,
    task: int,
    data: list[tuple[Tensor, Tensor]],
    *,
    classes: int | None = 2,
    lr: float = 0.1,
    epochs: int = 1,
    optimizer: str = "sgd",
    end: bool = True,
) -> None:
    """begin_task, `epochs` passes of soft-masked steps (grad mode), optionally end_task."""
    model.begin_task(task, num_classes=classes)
    params = [p for p in model.parameters() if p.requires_grad]
    base = (
        torch.optim.SGD(params, lr=lr)
        if optimizer == "sgd"
        else torch.optim.AdamW(params, lr=lr, eps=1e-8, weight_decay=0.0)
    )
    if optimizer == "sgd":
        opt = SoftMaskOptimizer(base, model, mask_mode="grad")
    else:  # the device masks gradients under AdamW too: the same on purpose
        with pytest.warns(UserWarning, match="adaptive optimizers rescale"):
            opt = SoftMaskOptimizer(base, model, mask_mode="grad")
    for _ in range(epochs):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    if end:
        model.end_task(data)


def mlp_model_after_two_tasks(
    importance_dtype: str = "float32", extra_heads: tuple[int, ...] = (2, 2)
) -> SoftMaskModel:
    """Tasks 0 and 1 learned in torch; heads for the device's tasks added (so both sides share them)."""
    net = mlp_multihead()
    model = get_softmask_model(net, SoftMaskConfig(importance_dtype=importance_dtype))
    for t in range(2):
        train_torch(model, t, batches(t))
    for classes in extra_heads:
        net.add_head(classes)
    return model


def export_copy(model: SoftMaskModel, directory: Path, **kwargs) -> Path:
    example = kwargs.pop("example", torch.randn(3, IN_FEATURES))
    export_for_device(model, example, directory, **kwargs)
    return directory


def export_before_format_4(
    monkeypatch: pytest.MonkeyPatch, model: SoftMaskModel, directory: Path, **kwargs
) -> Path:
    """Export as this library did before device format 4: no measured shapes (ONNX Runtime
    builds the broadcast gradients from its own shape inference, softmask_edge.shapes' bug)
    and format_version 3 in the manifest (which no hash covers)."""
    import softmask_edge.builder

    with monkeypatch.context() as m:
        m.setattr(softmask_edge.builder, "measure_shapes", lambda graph: 0)
        export_copy(model, directory, **kwargs)
    write_manifest(directory, {**read_manifest(directory), "format_version": 3})
    return directory


def clone_case(model: SoftMaskModel, artifacts: Path, target: Path) -> tuple[SoftMaskModel, Path]:
    """An independent copy of a (model, artifacts) pair for one test."""
    shutil.copytree(artifacts, target)
    return copy.deepcopy(model), target


def max_diff(a: dict[str, np.ndarray], b: dict[str, Tensor | np.ndarray]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float(np.abs(a[k] - np.asarray(b[k])).max()) for k in a)


def torch_weights(model: SoftMaskModel) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in model.base_model.named_parameters()}


def read_manifest(artifacts: Path) -> dict:
    """The raw manifest of an artifacts folder."""
    return json.loads((artifacts / "manifest.json").read_text())


def write_manifest(artifacts: Path, raw: dict) -> None:
    (artifacts / "manifest.json").write_text(json.dumps(raw))


def rehash(artifacts: Path) -> None:
    """Make the manifest's hashes match the files again (a consistent, deliberate edit)."""
    raw = read_manifest(artifacts)
    raw["checkpoint_sha256"] = sha256(artifacts / raw["checkpoint"])
    raw["history_sha256"] = sha256(artifacts / raw["history"])
    raw["graphs_sha256"] = {n: sha256(artifacts / n) for n in STATIC_FILES}
    write_manifest(artifacts, raw)


def tiny_bert_after_one_task(
    directory: Path, exporter=None, roberta: bool = False, **kwargs
) -> tuple[SoftMaskModel, list, Path]:
    """(model, task 0's batches, artifacts): a tiny BERT classifier (vocab 40; `roberta`: the
    RoBERTa twin, whose position ids follow the tokens: no broadcast over the batch) whose
    task 0 importance is measured, exported into `directory` by `exporter` (default
    `export_copy`; kwargs go to export_for_device). No dropout: torch and device agree."""
    if roberta:
        from transformers import RobertaForSequenceClassification

        from softmask_peft.testing import tiny_roberta_config

        torch.manual_seed(0)
        config = tiny_roberta_config(
            num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
        )
        net = RobertaForSequenceClassification(config).train()
    else:
        net = tiny_bert().train()
    model = get_softmask_model(net, SoftMaskConfig(head_modules=["classifier"]))
    data = text_batches()
    model.begin_task(0)
    model.end_task(data)
    example = {k: v for k, v in data[0].items() if k != "labels"}
    return model, data, (exporter or export_copy)(model, directory, example=example, **kwargs)


def device_script(artifacts: Path, x: np.ndarray, y: np.ndarray, then: str) -> str:
    """Python source for a separate device process (torch blocked): load the learner, learn
    and measure one task on (x, y), then run `then`."""
    head = f"""
        import sys
        sys.modules["torch"] = None  # a device: no torch
        import numpy as np
        from softmask_edge import EdgeLearner
        learner = EdgeLearner({str(artifacts)!r})
        x = np.asarray({x.tolist()!r}, np.float32)
        y = np.asarray({y.tolist()!r}, np.int64)
        learner.learn_task([(x, y)], lr=0.5)
        learner.end_task([(x, y)])
        """
    return textwrap.dedent(head) + textwrap.dedent(then)


def run_device_process(script: str, artifacts: Path, data: list) -> dict:
    """Run `script` in a fresh interpreter with (artifacts, JSON batches); its last line's JSON."""
    batches_json = json.dumps([(x.tolist(), y.tolist()) for x, y in data])
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), str(artifacts), batches_json],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
