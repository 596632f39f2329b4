"""Time of SPG's importance pass (`end_task`) for task t = 0, 4, 9 (1, 5, 10 heads).

Three ways to compute the same per-head gradient sums, on one model, data and weights
(dropout 0, so every way sees the same network; the table's max_diff columns show it):

* "ours": `SoftMaskModel.end_task` as shipped: one backbone forward per batch shared by all
  heads, the last linear layer's weight and bias gradients of the earlier heads factored
  through one shared product (softmask_peft/importance/spg.py), one batched backward for the
  rest.
* "before": the same pass with the factored last layer switched off
  (`SPGState.factored_last_layer = False`): every head through the batched backward.
* "per_head": a re-enactment of the official SPG code's schedule, written here (the official
  code itself is not in this repository and cannot be fetched): for each head a forward and
  backward pass over all the data, the gradients copied to the CPU after every batch. It is
  a re-enactment, not the official code; the issue measured the official code against
  "before" at 0.92x / 0.88x / 0.82x for t = 0 / 4 / 9.

Times are the best of `--repeats` runs, one thread by default. Default setting: MLP
64-512-512-512 with 10 heads, 4,000 samples, batch 64 (the issue's); `--arch cnn` for the
small CNN on 1x8x8 inputs.
Run: python bench/importance_pass.py --out results/bench_importance_pass.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import print_table, write_json
from softmask_bench.models import CNN, MLP

from softmask_peft import SoftMaskConfig, SoftMaskModel, get_softmask_model
from softmask_peft.heads import MultiHeadClassifier
from softmask_peft.testing import seed_importance

SHAPES = {"mlp": (64,), "cnn": (1, 8, 8)}


def data(shape: tuple[int, ...], n: int, batch: int) -> list:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall time of `repeats` calls and the last call's result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def model_at(arch: str, hidden: tuple[int, ...], task: int) -> SoftMaskModel:
    """A multi-head model whose task `task` is current (task + 1 heads, 2 classes each)."""
    torch.manual_seed(0)
    backbone = MLP(64, hidden, dropout=0.0) if arch == "mlp" else CNN((1, 8, 8), dropout=0.0)
    model = get_softmask_model(
        MultiHeadClassifier(backbone, backbone.out_features), SoftMaskConfig(method="spg")
    )
    for t in range(task):
        model.begin_task(t, num_classes=2)
        params = dict(model.base_model.named_parameters())
        seed_importance(
            model, {n: torch.zeros_like(params[n]) for n in model.masked_parameter_names}
        )
    model.begin_task(task, num_classes=2)
    return model


def library_sums(model: SoftMaskModel, batches: list, task: int, factored: bool) -> list:
    """The library's pass (what `end_task` runs) up to the per-head gradient sums."""
    state = model.method.start(task)
    state.factored_last_layer = factored
    for batch in batches:
        state = model.method.add(state, batch)
    return state.sums


def per_head_sums(model: SoftMaskModel, batches: list, task: int) -> list:
    """The official schedule, re-enacted: a forward + backward over all data for every head."""
    net = model.base_model
    named = dict(net.named_parameters())
    params = [named[n] for n in model.masked_parameter_names]
    sums = [torch.zeros(task + 1, *p.shape) for p in params]
    for h in range(task + 1):
        for x, y in batches:
            logits = net(x, task_id=h)
            loss = F.cross_entropy(logits, y) if h == task else logits.sum()
            for s, g in zip(sums, torch.autograd.grad(loss, params)):
                s[h] += g.cpu()
    return sums


def importance(model: SoftMaskModel, task: int, sums: list) -> list:
    state = model.method.start(task)
    state.sums = sums
    return list(model.method.result(state).values())


def max_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def measure(arch: str, hidden: tuple[int, ...], task: int, batches: list, repeats: int) -> dict:
    model = model_at(arch, hidden, task)
    t_ours, ours = timed(lambda: library_sums(model, batches, task, True), repeats)
    t_before, before = timed(lambda: library_sums(model, batches, task, False), repeats)
    t_per_head, per_head = timed(lambda: per_head_sums(model, batches, task), repeats)
    a_ours, a_before, a_per_head = (importance(model, task, s) for s in (ours, before, per_head))
    return {
        "model": arch,
        "task": task,
        "heads": task + 1,
        "ours_s": t_ours,
        "before_s": t_before,
        "per_head_s": t_per_head,
        "ours_x_per_head": t_ours / t_per_head,
        "before_x_per_head": t_before / t_per_head,
        "ours_x_before": t_ours / t_before,
        "max_diff_ours_before": max_diff(a_ours, a_before),
        "max_diff_before_per_head": max_diff(a_before, a_per_head),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench_importance_pass.json")
    parser.add_argument("--arch", choices=sorted(SHAPES), nargs="+", default=["mlp"])
    parser.add_argument("--hidden", default="512,512,512", help="MLP widths (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tasks", default="0,4,9", help="current task ids (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hidden = tuple(int(h) for h in args.hidden.split(","))
    rows = [
        measure(arch, hidden, int(t), data(SHAPES[arch], args.samples, args.batch), args.repeats)
        for arch in args.arch
        for t in args.tasks.split(",")
    ]
    diffs = ("max_diff_ours_before", "max_diff_before_per_head")
    print_table(
        [{**r, **{k: f"{r[k]:.1e}" for k in diffs}} for r in rows],
        ["model", "heads", "ours_s", "before_s", "per_head_s", "ours_x_per_head"]
        + ["before_x_per_head", *diffs],
    )
    write_json(args.out, "importance_pass", rows)


if __name__ == "__main__":
    main()
