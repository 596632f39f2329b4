"""Keep learning on a device: export to ONNX Runtime Training, learn a task without torch, come back.

Task 0 is learned in PyTorch; the export declares a head for task 1, which `EdgeLearner`
(onnxruntime-training + numpy, no torch) learns soft-masked and measures the importance of;
the device checkpoint then loads back into a SoftMaskModel. Run: python examples/device_learner.py
"""

import tempfile
from pathlib import Path

import torch
from softmask_edge import EdgeLearner  # the device side: import it on a device without torch
from torch import nn

from softmask_peft import MultiHeadClassifier, SoftMaskConfig, SoftMaskOptimizer, get_softmask_model
from softmask_peft.device import export_for_device, load_device_checkpoint


def task(t: int, n: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(t)
    x = torch.randn(n, 8, generator=g)
    y = (x @ torch.randn(8, generator=g) > 0).long()
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


torch.manual_seed(0)
net = MultiHeadClassifier(nn.Sequential(nn.Linear(8, 32), nn.Tanh()), feature_dim=32)
model = get_softmask_model(net, SoftMaskConfig())
model.begin_task(0, num_classes=2)
opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.2), model)
for _ in range(10):
    for x, y in task(0):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
model.end_task(task(0))

folder = Path(tempfile.mkdtemp()) / "artifacts"
export_for_device(model, torch.zeros(1, 8), folder, future_heads=[2])

# --- on the device (numpy batches, no torch needed) ---
device = EdgeLearner(folder)
data = [(x.numpy(), y.numpy()) for x, y in task(1)]
before = device.evaluate([(x.numpy(), y.numpy()) for x, y in task(0)], task_id=0)
device.learn_task(data, epochs=10, lr=0.2)
device.end_task(data, name="learned_on_device")
after = device.evaluate([(x.numpy(), y.numpy()) for x, y in task(0)], task_id=0)
print(f"task 0 accuracy on the device: before {before:.3f}, after learning task 1 {after:.3f}")
print(f"task 1 accuracy on the device: {device.evaluate(data, task_id=1):.3f}")
device.save()

# --- back on the server ---
load_device_checkpoint(model, folder)
print("server now knows:", [t.name for t in model.task_log])
