"""5-task Split-Digits inside Avalanche 0.6.0's own training and evaluation, SPG through the plugin.

Task-incremental (the task label picks the head at training and test time). The harness's data
(`softmask_bench.benchmarks.split_digits(seed)`: same splits, labels 0/1 per task) wrapped as an
Avalanche benchmark with `tensors_benchmark` (test split for evaluation; validation unused, as
in the harness's `fixed` protocol); the harness's MLP backbone (64 -> 128 -> 128, ReLU, dropout
0.2), built right after every random generator is seeded with `seed` (the harness's
`torch.manual_seed(seed)`, plus python's and numpy's, which A-GEM samples its memory with);
plain SGD (no momentum) at a constant lr, a fixed number of epochs, batch 32. Every method is
an Avalanche strategy trained with `strategy.train(exp)` and scored with
`strategy.eval(test_stream[: i + 1])` after each task (`accuracy_metrics(experience=True)`):

* naive, lwf (`LwF`), ewc (`EWC`, separate), mas (`MAS`), gem (`GEM`), agem (`AGEM`): a
  `MultiTaskModule` of the backbone and Avalanche's own `MultiHeadClassifier`;
* spg: `SoftMaskModel(MultiHeadClassifier(backbone))` in a `SoftMaskTaskModule`, trained by
  `Naive` with `SoftMaskPlugin` (softmask_peft.integrations.avalanche).

R[i][j] = test accuracy (%) on task j after task i. ACC = mean_j R[T-1][j];
BWT = mean_{j<T-1} (R[T-1][j] - R[j][j]); forgetting = mean_{j<T-1} max_{j<=l<T-1}
(R[l][j] - R[T-1][j]) (Chaudhry et al. 2018); plasticity = mean_j R[j][j] (each task right
after learning it); newest = R[T-1][T-1]. Mean ± sample std over seeds.

    python bench/avalanche_compare.py --jobs 2   # ~2 min on 2 cores
    python bench/avalanche_compare.py --methods spg \
        --spg-option head_scaling=all \
        --out docs/results/avalanche/split_digits_spg_head_scaling_all.json

`--spg-option key=value` (repeatable) sets a `SoftMaskConfig` field (JSON values: numbers,
strings, true/false, null); `--spg-option method_config.key=value` sets a key of its
`method_config` dict. Needs the extra `avalanche` (avalanche-lib 0.6.0, torchvision 0.28.0 on
the PyPI torch 2.13.0 build; see docs/guides/avalanche.md).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import torch
from _common import print_table, write_json
from avalanche.benchmarks import tensors_benchmark
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models import MultiHeadClassifier as AvalancheHeads
from avalanche.models import MultiTaskModule
from avalanche.training import AGEM, EWC, GEM, MAS, LwF, Naive
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin
from softmask_bench.benchmarks import Benchmark, split_digits
from softmask_bench.metrics import compute_metrics, mean_std
from softmask_bench.models import build_backbone
from torch import Tensor

from softmask_peft import SoftMaskConfig, get_softmask_model
from softmask_peft.errors import ConfigError
from softmask_peft.heads import MultiHeadClassifier
from softmask_peft.integrations.avalanche import SoftMaskPlugin, SoftMaskTaskModule

METHODS = ("naive", "lwf", "ewc", "mas", "gem", "agem", "spg")


class BackboneHeads(MultiTaskModule):
    """The baselines' network: the harness's backbone and Avalanche's MultiHeadClassifier."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = AvalancheHeads(backbone.out_features, initial_out_features=2)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return self.classifier(self.backbone(x), task_label)


def avalanche_benchmark(bench: Benchmark):
    """The harness's tasks as an Avalanche task-incremental benchmark (task label k = task k)."""
    return tensors_benchmark(
        train_tensors=[[t.train.x, t.train.y] for t in bench.tasks],
        test_tensors=[[t.test.x, t.test.y] for t in bench.tasks],
        task_labels=list(range(bench.num_tasks)),
    )


def parse_spg_options(items: list[str]) -> dict:
    """`key=value` pairs into SoftMaskConfig keyword arguments (values parsed as JSON when they
    parse, else kept as strings); `method_config.key=value` goes into `method_config`."""
    options: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--spg-option takes key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key.startswith("method_config."):
            options.setdefault("method_config", {})[key.split(".", 1)[1]] = value
        else:
            options[key] = value
    return options


def build_strategy(method: str, args: argparse.Namespace, backbone: torch.nn.Module):
    """(strategy, SoftMaskModel or None) for `method`; every strategy with the same budget."""
    common = dict(
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=args.batch_size,
        train_epochs=args.epochs,
        eval_mb_size=256,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True)),
    )
    if method == "spg":
        model = get_softmask_model(
            MultiHeadClassifier(backbone, backbone.out_features),
            SoftMaskConfig(**parse_spg_options(args.spg_option)),
        )
        net = SoftMaskTaskModule(model)
        opt = torch.optim.SGD(net.parameters(), lr=args.lr)
        plugin = SoftMaskPlugin(model)
        return Naive(model=net, optimizer=opt, plugins=[plugin], **common), model
    net = BackboneHeads(backbone)
    common |= dict(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=args.lr))
    if method == "naive":
        return Naive(**common), None
    if method == "lwf":
        return LwF(alpha=args.lwf_alpha, temperature=args.lwf_temperature, **common), None
    if method == "ewc":
        return EWC(ewc_lambda=args.ewc_lambda, mode="separate", **common), None
    if method == "mas":
        return MAS(lambda_reg=args.mas_lambda, alpha=args.mas_alpha, **common), None
    if method == "gem":
        return GEM(patterns_per_exp=args.memory, memory_strength=0.5, **common), None
    if method == "agem":
        return AGEM(patterns_per_exp=args.memory, sample_size=args.memory, **common), None
    raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def run(method: str, seed: int, args: argparse.Namespace) -> dict:
    """One method on one seed: the accuracy matrix from Avalanche's evaluation, and metrics."""
    torch.set_num_threads(1)  # runs go side by side (--jobs); one thread each, deterministic
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="No loggers specified")
    bench = split_digits(seed)
    scenario = avalanche_benchmark(bench)
    RNGManager.set_random_seeds(seed)  # python, numpy and torch: A-GEM samples its memory
    backbone = build_backbone("mlp", bench.input_shape, tuple(args.hidden))
    strategy, model = build_strategy(method, args, backbone)
    tasks = bench.num_tasks
    matrix = [[float("nan")] * tasks for _ in range(tasks)]
    start = time.perf_counter()
    for i, exp in enumerate(scenario.train_stream):
        strategy.train(exp, eval_streams=[], num_workers=0)
        results = strategy.eval(scenario.test_stream[: i + 1], num_workers=0)
        for j in range(i + 1):
            key = f"Top1_Acc_Exp/eval_phase/test_stream/Task{j:03d}/Exp{j:03d}"
            matrix[i][j] = 100.0 * float(results[key])
    row = {"method": method, "seed": seed, **compute_metrics(matrix)}
    row["matrix"] = [[None if math.isnan(v) else v for v in r] for r in matrix]  # JSON null
    row["newest"] = matrix[-1][-1]
    row["seconds"] = time.perf_counter() - start
    if model is not None:
        row["config"] = model.softmask_config.to_dict()
        row["mask_mode"] = strategy.optimizer.mask_mode
    return row


def summary(rows: list[dict], methods: list[str]) -> list[dict]:
    """Mean ± std over seeds per method."""
    out = []
    for method in methods:
        runs = [r for r in rows if r["method"] == method]
        line: dict = {"method": method, "seeds": len(runs)}
        for key in ("acc", "bwt", "forgetting", "plasticity", "newest"):
            m, s = mean_std([r[key] for r in runs])
            line[key] = f"{m:.2f} ± {s:.2f}"
        out.append(line)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden", nargs="+", type=int, default=[128, 128])
    p.add_argument("--spg-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--lwf-alpha", type=float, default=1.0)
    p.add_argument("--lwf-temperature", type=float, default=2.0)
    p.add_argument("--ewc-lambda", type=float, default=10000.0)
    p.add_argument("--mas-lambda", type=float, default=1.0)
    p.add_argument("--mas-alpha", type=float, default=0.5)
    p.add_argument("--memory", type=int, default=64, help="GEM / A-GEM patterns per task")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one thread each)")
    p.add_argument("--out", default="docs/results/avalanche/split_digits.json")
    args = p.parse_args()
    parse_spg_options(args.spg_option)  # refuse a malformed option before any training
    runs = [(m, s) for s in args.seeds for m in args.methods]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run, m, s, args) for m, s in runs]
        for future in as_completed(futures):
            row = future.result()
            print(
                f"seed {row['seed']} {row['method']:6s} ACC {row['acc']:.2f} forgetting "
                f"{row['forgetting']:.2f} newest {row['newest']:.2f} ({row['seconds']:.0f} s)",
                flush=True,
            )
    rows = [f.result() for f in futures]  # in (seed, method) order
    table = summary(rows, args.methods)
    print_table(table, ["method", "seeds", "acc", "bwt", "forgetting", "plasticity", "newest"])
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    write_json(Path(args.out), "avalanche split-digits (task-incremental)", rows)
    data = json.loads(Path(args.out).read_text())
    data |= {"settings": settings, "summary": table}
    Path(args.out).write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
