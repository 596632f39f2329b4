"""Run methods over a benchmark: task sequences, the joint upper bound, EWC's λ selection.

All methods of a comparison share data, architecture, per-task budget (`TrainConfig`) and seeds.
`torch.manual_seed(seed)` is set before the network is built, so every method starts from the
same initial weights for a given seed.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from softmask_peft import SoftMaskModel
from softmask_peft.config import PAPER_CAPACITY
from softmask_peft.errors import ConfigError

from .benchmarks import SCENARIOS, Benchmark, get_benchmark
from .metrics import compute_metrics
from .models import build_classifier
from .strategies import (
    AGEMStrategy,
    EWCStrategy,
    FinetuneStrategy,
    LwFStrategy,
    MASStrategy,
    ReplayStrategy,
    SoftMaskStrategy,
    Strategy,
)
from .training import TrainConfig, batches, evaluate, fit

EWC_LAMBDAS = (1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0)
METHOD_NAMES = (
    "spg",
    "spg-official",
    "spg-update",
    "spg-adapters",
    "finetune",
    "ewc",
    "mas",
    "lwf",
    "replay",
    "agem",
    "joint",
)


@dataclass
class RunResult:
    """One method on one seed. `matrix[i][j]` = test accuracy (%) on task j after task i;
    None where task j's head does not exist yet (task-incremental, j > i). Joint training has
    only the final row. `model` is the trained model (SPG: its SoftMaskModel), not serialised."""

    method: str
    seed: int
    benchmark: str
    scenario: str
    arch: str
    matrix: list[list[float | None]]
    metrics: dict[str, float | None]
    epochs: list[int]
    seconds: float
    info: dict[str, object] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields (the trained model is left out)."""
        out = asdict(replace(self, model=None))
        del out["model"]
        return out


def _eval_batches(bench: Benchmark, task_id: int, part: str):
    return batches([(getattr(bench.tasks[task_id], part), task_id)], 256)


def run_sequence(
    strategy: Strategy,
    bench: Benchmark,
    scenario: str,
    arch: str,
    seed: int,
    cfg: TrainConfig,
    eval_part: str = "test",
    capacity: list[dict[str, float]] | None = None,
) -> tuple[list[list[float | None]], list[int]]:
    """Train the tasks in order with `strategy` (its trained model stays in `strategy.model`);
    return (accuracy matrix on `eval_part`, epochs per task). A soft-masked model's capacity
    after each task (saturation, mean keep) is appended to `capacity` when given."""
    torch.manual_seed(seed)
    net = build_classifier(arch, bench.input_shape, scenario, bench.num_classes, cfg.mlp_hidden)
    strategy.setup(net, scenario)
    matrix, epochs = [], []
    for t, task in enumerate(tqdm(bench.tasks, desc=strategy.name, leave=False, disable=None)):
        strategy.begin_task(t, task)
        train = batches([(task.train, t)], cfg.batch_size, seed * 1000 + t)
        val = _eval_batches(bench, t, "val")
        history = fit(
            strategy.model,
            strategy.make_optimizer(),
            train,
            val,
            cfg,
            penalty=strategy.penalty,
            desc=f"{strategy.name} task {t}",
        )
        epochs.append(len(history))
        strategy.end_task(t, task)
        if capacity is not None and isinstance(strategy.model, SoftMaskModel):
            report = strategy.model.capacity()
            capacity.append({"saturation": report.saturation, "mean_keep": report.mean_keep})
        seen = t + 1 if scenario == "task" else bench.num_tasks
        row = [
            evaluate(strategy.model, _eval_batches(bench, j, eval_part), strategy.infers_task)[1]
            for j in range(seen)
        ]
        matrix.append(row + [None] * (bench.num_tasks - seen))
    return matrix, epochs


def run_joint(
    bench: Benchmark, scenario: str, arch: str, seed: int, cfg: TrainConfig
) -> tuple[list[list[float | None]], list[int], nn.Module]:
    """Upper bound: one training run on every task's data at once (task-incremental: all heads
    trained jointly, each sample by its own task's head). Returns the final row only and the
    trained network."""
    torch.manual_seed(seed)
    net = build_classifier(arch, bench.input_shape, scenario, bench.num_classes, cfg.mlp_hidden)
    if scenario == "task":
        for task in bench.tasks:
            net.add_head(task.num_classes)
    train = batches([(t.train, k) for k, t in enumerate(bench.tasks)], cfg.batch_size, seed)
    val = batches([(t.val, k) for k, t in enumerate(bench.tasks)], 256)
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr)
    history = fit(net, optimizer, train, val, cfg, desc="joint")
    row = [evaluate(net, _eval_batches(bench, j, "test"))[1] for j in range(bench.num_tasks)]
    return [row], [len(history)], net


def select_ewc_lambda(
    bench: Benchmark,
    scenario: str,
    arch: str,
    seed: int,
    cfg: TrainConfig,
    grid: Sequence[float] = EWC_LAMBDAS,
) -> float:
    """λ with the best mean *validation* accuracy over tasks 0 and 1 after training both;
    ties (easy tasks saturate at 100%) go to the lower mean validation loss, then the smaller
    λ. Uses only the first two tasks' train and validation data."""
    first_two = replace(bench, tasks=bench.tasks[:2])
    best, best_score = grid[0], (-math.inf, -math.inf)
    for lam in tqdm(grid, desc="ewc lambda", leave=False, disable=None):
        strategy = EWCStrategy(cfg, lam)
        matrix, _ = run_sequence(strategy, first_two, scenario, arch, seed, cfg, eval_part="val")
        losses = [evaluate(strategy.model, _eval_batches(first_two, j, "val"))[0] for j in (0, 1)]
        score = (sum(matrix[-1]) / 2, -sum(losses) / 2)
        if score > best_score:
            best, best_score = lam, score
    return best


# the official SPG code's behaviour: every head scaled, every task's importance kept whole
SPG_OFFICIAL = {
    "head_scaling": "all",
    **PAPER_CAPACITY,
    "method_config": {"cross_heads": True},
}


def _strategy_factory(
    method: str,
    importance_dtype: str,
    mas_lambda: float,
    spg_options: Mapping[str, Any],
    adapter_rank: int,
    adapter_options: Mapping[str, Any],
) -> Callable[..., Strategy]:
    factories: dict[str, Callable[..., Strategy]] = {
        "spg": lambda cfg: SoftMaskStrategy(cfg, "grad", "sgd", importance_dtype, spg_options),
        "spg-official": lambda cfg: SoftMaskStrategy(
            cfg, "grad", "sgd", importance_dtype, SPG_OFFICIAL, name="spg-official"
        ),
        "spg-update": lambda cfg: SoftMaskStrategy(
            cfg, "update", "adamw", importance_dtype, spg_options
        ),
        "spg-adapters": lambda cfg: SoftMaskStrategy(
            cfg,
            "grad",
            "sgd",
            importance_dtype,
            {**PAPER_CAPACITY, **spg_options},
            name="spg-adapters",
            adapter_rank=adapter_rank,
            adapter_options=adapter_options,
        ),
        "finetune": FinetuneStrategy,
        "mas": lambda cfg: MASStrategy(cfg, mas_lambda),
        "lwf": LwFStrategy,
        "replay": ReplayStrategy,
        "agem": AGEMStrategy,
    }
    return factories[method]


def check_methods(methods: Sequence[str]) -> list[str]:
    """Validate method names; raise a ConfigError listing unknown ones and the choices."""
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown or not methods:
        raise ConfigError(
            f"unknown method(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(METHOD_NAMES)}"
        )
    return list(methods)


def run_method(
    method: str,
    bench: Benchmark,
    scenario: str,
    arch: str,
    seed: int,
    cfg: TrainConfig,
    importance_dtype: str = "float32",
    ewc_lambda: float | None = None,
    mas_lambda: float = 1.0,
    spg_options: Mapping[str, Any] | None = None,
    adapter_rank: int = 32,
    adapter_options: Mapping[str, Any] | None = None,
) -> RunResult:
    """One method on one seed. EWC picks λ by `select_ewc_lambda` unless `ewc_lambda` is given;
    `spg_options` are SoftMaskConfig fields for spg, spg-update and spg-adapters (spg-official
    ignores them); `adapter_rank` is spg-adapters' task-adapter rank and `adapter_options` its
    other `MultiHeadClassifier` keywords (adapter_scale, adapter_init, adapter_freeze_a)."""
    check_methods([method])
    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    start = time.perf_counter()
    info: dict[str, object] = {}
    if method == "joint":
        matrix, epochs, model = run_joint(bench, scenario, arch, seed, cfg)
    else:
        if method == "ewc":
            lam = ewc_lambda
            if lam is None:
                lam = select_ewc_lambda(bench, scenario, arch, seed, cfg)
                info["ewc_lambda_grid"] = list(EWC_LAMBDAS)
            strategy: Strategy = EWCStrategy(cfg, lam)
        else:
            strategy = _strategy_factory(
                method,
                importance_dtype,
                mas_lambda,
                spg_options or {},
                adapter_rank,
                adapter_options or {},
            )(cfg)
        capacity: list[dict[str, float]] = []
        matrix, epochs = run_sequence(strategy, bench, scenario, arch, seed, cfg, capacity=capacity)
        info.update(strategy.info())
        if capacity:
            info["capacity"] = capacity
        model = strategy.model
    return RunResult(
        method=method,
        seed=seed,
        benchmark=bench.name,
        scenario=scenario,
        arch=arch,
        matrix=matrix,
        metrics=compute_metrics(matrix),
        epochs=epochs,
        seconds=round(time.perf_counter() - start, 2),
        info=info,
        model=model,
    )


def run_benchmark(
    benchmark: str,
    methods: Sequence[str],
    seeds: Sequence[int],
    cfg: TrainConfig,
    scenario: str | None = None,
    arch: str = "mlp",
    importance_dtype: str = "float32",
    ewc_lambda: float | None = None,
    mas_lambda: float = 1.0,
    on_result: Callable[[list[RunResult]], None] | None = None,
    spg_options: Mapping[str, Any] | None = None,
    num_tasks: int | None = None,
    adapter_rank: int = 32,
    adapter_options: Mapping[str, Any] | None = None,
) -> list[RunResult]:
    """Every method on every seed (the benchmark's data is rebuilt per seed).

    `on_result(results_so_far)` runs after each method/seed, e.g. to keep a report current
    during a long run.
    """
    methods = check_methods(methods)
    results = []
    for seed in tqdm(seeds, desc="seeds", disable=None):
        bench = get_benchmark(benchmark, seed, num_tasks)
        scen = scenario or bench.default_scenario
        for method in tqdm(methods, desc=f"seed {seed}", leave=False, disable=None):
            r = run_method(
                method,
                bench,
                scen,
                arch,
                seed,
                cfg,
                importance_dtype,
                ewc_lambda,
                mas_lambda,
                spg_options,
                adapter_rank,
                adapter_options,
            )
            tqdm.write(
                f"{benchmark} ({scen}) seed {seed} {method}: "
                + ", ".join(f"{k}={v:.2f}" for k, v in r.metrics.items() if v is not None)
                + f" [{r.seconds:.0f}s]",
                file=sys.stderr,
            )
            results.append(r)
            if on_result is not None:
                on_result(results)
    return results
