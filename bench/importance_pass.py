"""Time of SPG's importance pass for task t = 0, 4, 9 (1, 5, 10 heads), as a multiple of one
training epoch on the same 2,000 samples, for the benchmark MLP and the small CNN.

"ours" is `SoftMaskModel.end_task` (one backbone forward per batch shared by all heads, one
batched backward for every head's loss). "per-head" re-enacts the official code's schedule:
for each head a full forward and backward pass over the data, gradients copied to the CPU
after each batch.
Run: python bench/importance_pass.py --out results/bench_importance_pass.json
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _common import print_table, write_json
from softmask_bench.models import build_classifier

from softmask_peft import SoftMaskConfig, get_softmask_model

SHAPES = {"mlp": (64,), "cnn": (1, 8, 8)}


def data(shape: tuple[int, ...], n: int = 2000, batch: int = 64) -> list:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def per_head_pass(model, batches, task: int) -> None:
    """The official schedule: a forward + backward over all data for every head."""
    net = model.base_model
    params = [p for n, p in net.named_parameters() if n in set(model.masked_parameter_names)]
    sums = [torch.zeros_like(p, device="cpu") for p in params]
    for h in range(task + 1):
        for x, y in batches:
            logits = net(x, task_id=h)
            loss = F.cross_entropy(logits, y) if h == task else logits.sum()
            grads = torch.autograd.grad(loss, params)
            for s, g in zip(sums, grads):
                s += g.cpu()


def measure(arch: str, shape: tuple[int, ...], task: int, batches: list) -> dict:
    """Times for the importance pass of `task` (task + 1 heads) and one training epoch."""
    torch.manual_seed(0)
    net = build_classifier(arch, shape, "task", 2)
    model = get_softmask_model(net, SoftMaskConfig(method="spg"))
    for t in range(task):
        model.begin_task(t, num_classes=2)
        params = dict(net.named_parameters())
        model.store.close({n: torch.zeros_like(params[n]) for n in model.masked_parameter_names})
    model.begin_task(task, num_classes=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def epoch() -> None:
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    epoch()  # warm-up
    t_epoch = min(timed(epoch) for _ in range(3))
    t_ours = min(timed(lambda: model.method.run(task, batches)) for _ in range(3))
    t_naive = min(timed(lambda: per_head_pass(model, batches, task)) for _ in range(2))
    return {
        "model": arch,
        "task": task,
        "heads": task + 1,
        "epoch_s": t_epoch,
        "ours_s": t_ours,
        "ours_x_epoch": t_ours / t_epoch,
        "per_head_s": t_naive,
        "per_head_x_epoch": t_naive / t_epoch,
        "speedup": t_naive / t_ours,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench_importance_pass.json")
    args = parser.parse_args()
    rows = [
        measure(arch, shape, task, data(shape))
        for arch, shape in SHAPES.items()
        for task in (0, 4, 9)
    ]
    print_table(rows, ["model", "heads", "epoch_s", "ours_x_epoch", "per_head_x_epoch", "speedup"])
    write_json(args.out, "importance_pass", rows)


if __name__ == "__main__":
    main()
