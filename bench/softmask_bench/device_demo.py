"""Server-then-device demo: the first tasks in PyTorch, the rest on a "device" (ONNX Runtime
Training or ExecuTorch, `runtime`).

Tasks 0..k-1 are learned with SPG in PyTorch (SGD, early stopping on validation loss, as the
benchmarks), the model is exported with one declared head per remaining task
(task-incremental: the task id is given at test time), and the remaining tasks are learned by
`softmask_edge.EdgeLearner` twice from the same artifacts: soft-masked by the accumulated
importance (with the on-device importance pass after every task), and unmasked (plain
on-device fine-tuning). Rows 0..k-1 of both accuracy matrices are the shared PyTorch part.

R[i][j] = test accuracy (%) on task j after task i; None where head j does not exist yet.
ACC, BWT and Forgetting as in `softmask_bench.metrics`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from softmask_peft.config import SoftMaskConfig
from softmask_peft.device import export_for_device
from softmask_peft.errors import ConfigError
from softmask_peft.model import SoftMaskModel
from softmask_peft.optim import SoftMaskOptimizer

from .benchmarks import Split, get_benchmark
from .metrics import compute_metrics
from .models import build_classifier, head_module_names
from .training import TrainConfig, batches, evaluate, fit, xy_batches


@dataclass
class DeviceDemoResult:
    """Accuracy matrices of the soft-masked device run and the unmasked device baseline."""

    benchmark: str
    seed: int
    torch_tasks: int
    device_tasks: int
    task_incremental: bool
    matrices: dict[str, list[list[float | None]]]
    metrics: dict[str, dict[str, float | None]]
    seconds: dict[str, float] = field(default_factory=dict)
    runtime: str = "onnxruntime"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _numpy_batches(split: Split, batch_size: int, rng: np.random.Generator | None):
    x, y = split.x.numpy(), split.y.numpy()
    order = np.arange(len(y)) if rng is None else rng.permutation(len(y))
    return [
        (x[order[i : i + batch_size]], y[order[i : i + batch_size]])
        for i in range(0, len(y), batch_size)
    ]


def _torch_part(
    bench, tasks: int, arch: str, cfg: TrainConfig, seed: int, importance_dtype: str
) -> tuple[SoftMaskModel, list[list[float | None]]]:
    torch.manual_seed(seed)
    net = build_classifier(arch, bench.input_shape, "task", bench.num_classes)
    model = SoftMaskModel(
        net,
        SoftMaskConfig(head_modules=head_module_names("task"), importance_dtype=importance_dtype),
    )
    rows = []
    for t in range(tasks):
        task = bench.tasks[t]
        model.begin_task(t, num_classes=task.num_classes, name=task.name)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = SoftMaskOptimizer(torch.optim.SGD(params, lr=cfg.lr), model)
        train = batches([(task.train, t)], cfg.batch_size, seed=seed + t)
        val = batches([(task.val, t)], 256)
        fit(model, optimizer, train, val, cfg, desc=f"torch task {t}")
        model.end_task(xy_batches(task.train, cfg.batch_size))
        rows.append(
            [
                evaluate(model, batches([(bench.tasks[j].test, j)], 256))[1] if j <= t else None
                for j in range(bench.num_tasks)
            ]
        )
    return model, rows


def _device_part(
    artifacts: Path,
    bench,
    first: int,
    masked: bool,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    early_stopping: TrainConfig | None,
) -> list[list[float | None]]:
    from softmask_edge import EarlyStopping, EdgeLearner

    learner = EdgeLearner(artifacts, seed=seed)
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(first, bench.num_tasks):
        task = bench.tasks[t]
        if early_stopping is not None:
            cfg = early_stopping
            options = EarlyStopping(cfg.patience, cfg.lr_patience, cfg.lr_factor, cfg.lr_min)
            learner.learn_task(
                _numpy_batches(task.train, batch_size, rng),
                epochs=epochs,
                lr=lr,
                masked=masked,
                validation=_numpy_batches(task.val, 256, None),
                early_stopping=options,
            )
        else:
            for _ in range(epochs):
                learner.learn_task(
                    _numpy_batches(task.train, batch_size, rng), epochs=1, lr=lr, masked=masked
                )
        learner.end_task(_numpy_batches(task.train, batch_size, None), name=task.name)
        rows.append(
            [
                100.0 * learner.evaluate(_numpy_batches(bench.tasks[j].test, 256, None), task_id=j)
                if j <= t
                else None
                for j in range(bench.num_tasks)
            ]
        )
    return rows


def run_device_demo(
    benchmark: str = "split-digits",
    torch_tasks: int = 3,
    *,
    arch: str = "mlp",
    seed: int = 0,
    train_config: TrainConfig | None = None,
    device_epochs: int | None = None,
    device_lr: float | None = None,
    device_early_stopping: bool = True,
    importance_dtype: str = "uint8",
    workdir: str | Path | None = None,
    runtime: str = "onnxruntime",
) -> DeviceDemoResult:
    """Learn `torch_tasks` tasks in PyTorch, the rest on the device; return both matrices.

    Device tasks get plain SGD at `device_lr` (default: the torch lr). With
    `device_early_stopping` (default) the device gets the task's validation split and the
    torch protocol's budget (at most `device_epochs`, default the torch epochs; lr decay on
    plateaus, early stop, best weights kept; one shuffle of the batches); without it,
    `device_epochs` (default 10) epochs at a constant lr on batches reshuffled per epoch.
    Artifacts go to `workdir` (kept) or a temporary directory (removed). `runtime` picks the
    device runtime ("onnxruntime" or "executorch"); the learner code is the same.
    """
    cfg = train_config or TrainConfig()
    bench = get_benchmark(benchmark, seed)
    if not 0 < torch_tasks < bench.num_tasks:
        raise ConfigError(
            f"torch_tasks must be in [1, {bench.num_tasks - 1}] for {benchmark}, got {torch_tasks}"
        )
    lr = cfg.lr if device_lr is None else device_lr
    if device_epochs is None:
        device_epochs = cfg.epochs if device_early_stopping else 10
    start = time.perf_counter()
    model, torch_rows = _torch_part(bench, torch_tasks, arch, cfg, seed, importance_dtype)
    seconds = {"torch": time.perf_counter() - start}
    root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="device_demo."))
    try:
        start = time.perf_counter()
        source = root / "exported"
        example = bench.tasks[0].train.x[:2]
        future = [t.num_classes for t in bench.tasks[torch_tasks:]]
        export_for_device(
            model, example, source, future_heads=future, optimizer="sgd", runtime=runtime
        )
        seconds["export"] = time.perf_counter() - start
        matrices = {}
        for name, masked in (("softmask", True), ("finetune", False)):
            start = time.perf_counter()
            run_dir = root / f"device_{name}"
            shutil.copytree(source, run_dir, dirs_exist_ok=True)
            device_rows = _device_part(
                run_dir,
                bench,
                torch_tasks,
                masked,
                device_epochs,
                lr,
                cfg.batch_size,
                seed,
                cfg if device_early_stopping else None,
            )
            matrices[name] = torch_rows + device_rows
            seconds[f"device_{name}"] = time.perf_counter() - start
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return DeviceDemoResult(
        benchmark=benchmark,
        seed=seed,
        torch_tasks=torch_tasks,
        device_tasks=bench.num_tasks - torch_tasks,
        task_incremental=True,
        matrices=matrices,
        metrics={name: compute_metrics(m) for name, m in matrices.items()},
        seconds=seconds,
        runtime=runtime,
    )
