"""Quick start: SPG on a tiny synthetic task sequence (task-incremental, one head per task).

Prints every task's test accuracy before and after each task, so forgetting is visible as a
drop along a column. Run: python examples/quickstart_spg.py
"""

from pathlib import Path

import torch
from torch import nn

from softmask_peft import MultiHeadClassifier, SoftMaskConfig, SoftMaskOptimizer, get_softmask_model

torch.manual_seed(0)
NUM_TASKS, DIM = 4, 20


def make_task(t: int, n: int = 512) -> tuple[list, tuple]:
    """Binary task t: the label is the sign of a task-specific random projection."""
    g = torch.Generator().manual_seed(100 + t)
    w = torch.randn(DIM, generator=g)
    x = torch.randn(2 * n, DIM, generator=g)
    y = (x @ w > 0).long()
    train = [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]
    return train, (x[n:], y[n:])


tasks = [make_task(t) for t in range(NUM_TASKS)]
backbone = nn.Sequential(
    nn.Linear(DIM, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 64), nn.ReLU()
)
net = MultiHeadClassifier(backbone, feature_dim=64)
model = get_softmask_model(net, SoftMaskConfig(method="spg"))  # heads: the task heads
opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)  # SGD: grad masking


@torch.no_grad()
def accuracy(task_id: int) -> float:
    model.eval()
    x, y = tasks[task_id][1]
    return (model(x, task_id=task_id).argmax(1) == y).float().mean().item()


for t, (train, _) in enumerate(tasks):
    model.begin_task(t, num_classes=2)
    before = "  ".join(f"task {j}: {accuracy(j):.3f}" for j in range(t + 1))
    print(f"before task {t} (new head untrained)  | {before}")
    model.train()
    for _epoch in range(20):
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.end_task(train)
    row = "  ".join(f"task {j}: {accuracy(j):.3f}" for j in range(t + 1))
    print(f"after task {t}                         | {row}")

model.save_pretrained("run/quickstart")
print("saved to run/quickstart:", sorted(p.name for p in Path("run/quickstart").iterdir()))
