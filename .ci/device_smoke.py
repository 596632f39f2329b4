"""CI's Python 3.12 check of the device side (ONNX Runtime Training's cp312 wheels).

    python .ci/device_smoke.py export DIR   # this Python, with torch: train task 0, export
    python3.12 .ci/device_smoke.py learn DIR   # Python 3.12 with only numpy, onnx, onnxruntime

`learn` runs torch-free (it asserts torch is not importable), learns task 1 on the device,
measures its importance, saves, and checks the accuracies; `export` then reads the device
checkpoint back (`verify`). This is the device as a user installs it: no torch, only what the
`onnx` extra brings (the whole suite, torch side included, also runs on 3.12 in `.ci/run`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np


def task(t: int, n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(t)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    y = (x @ rng.standard_normal(8).astype(np.float32) > 0).astype(np.int64)
    return x, y


def batches(t: int) -> list[tuple[np.ndarray, np.ndarray]]:
    x, y = task(t)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(y), 32)]


def export(folder: Path) -> None:
    import torch
    from torch import nn

    from softmask_peft import (
        MultiHeadClassifier,
        SoftMaskConfig,
        SoftMaskOptimizer,
        get_softmask_model,
    )
    from softmask_peft.device import export_for_device

    torch.manual_seed(0)
    net = MultiHeadClassifier(nn.Sequential(nn.Linear(8, 32), nn.Tanh()), feature_dim=32)
    model = get_softmask_model(net, SoftMaskConfig())
    model.begin_task(0, num_classes=2)
    opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.2), model)
    data = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches(0)]
    for _ in range(10):
        for x, y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.end_task(data)
    export_for_device(model, torch.zeros(1, 8), folder, future_heads=[2])


def learn(folder: Path) -> None:
    assert importlib.util.find_spec("torch") is None, "the device side must run without torch"
    from softmask_edge import EdgeLearner

    device = EdgeLearner(folder)
    device.learn_task(batches(1), epochs=10, lr=0.2)
    device.end_task(batches(1), name="learned_on_python_3_12")
    old, new = device.evaluate(batches(0), task_id=0), device.evaluate(batches(1), task_id=1)
    device.save()
    print(f"Python {sys.version.split()[0]}: task 0 {old:.3f}, task 1 {new:.3f} (device)")
    assert old > 0.9 and new > 0.9, (old, new)


def verify(folder: Path) -> None:
    from softmask_peft.device import read_device_checkpoint

    state = read_device_checkpoint(folder)
    assert [t.name for t in state.tasks[: len(state.history)]][-1] == "learned_on_python_3_12"
    print("device checkpoint read back:", len(state.history), "task(s)")


if __name__ == "__main__":
    {"export": export, "learn": learn, "verify": verify}[sys.argv[1]](Path(sys.argv[2]))
