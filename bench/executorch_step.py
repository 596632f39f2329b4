"""ExecuTorch device learner vs torch eager vs the ONNX Runtime learner: step time, sizes, start.

For the digits-sized MLP of bench/edge_step.py (64-256-256-10, ReLU, shared head, dropout 0,
batch 32), a wider one (64-1024-1024-10) and a tanh one; CNNs are left out: executorch 1.5.1's pooling backward
kernels are wrong, and the export refuses them:
* `torch_ms`: eager zero_grad + forward + backward + SoftMaskOptimizer(SGD) step (grad mode);
* `ort_ms`: one `EdgeLearner` step on ONNX Runtime Training artifacts (masked, SGD);
* `et_ms`: one `EdgeLearner` step on ExecuTorch artifacts exported with `xnnpack=False` (the
  portable kernels): the training program's forward + backward with keep inputs, then
  ExecuTorch's SGD on its weights;
* `et_xnn_ms`: the same, delegated to XNNPACK (`xnnpack=True`, the default).
Steps run alternately (paired medians), so load drift on a shared machine hits all alike; the
ratios are the result, not the absolute times. Sizes: the .pte/.ptd files and the ONNX
graphs; `start_ms`: EdgeLearner(folder) (load + checks + first bind), median of 5.
Run: python bench/executorch_step.py --out results/bench_executorch_step.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import paired_medians, print_table, write_json
from softmask_bench.models import MLP, SharedHeadClassifier
from softmask_edge import EdgeLearner
from torch import nn

from softmask_peft import SoftMaskConfig, SoftMaskOptimizer, get_softmask_model
from softmask_peft.device import export_for_device
from softmask_peft.errors import ConfigError


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    small, wide = MLP(64, dropout=0.0), MLP(64, hidden=(1024, 1024), dropout=0.0)
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh())
    return {
        "mlp 64-256-256-10": SharedHeadClassifier(small, small.out_features, 10),
        "mlp 64-1024-1024-10": SharedHeadClassifier(wide, wide.out_features, 10),
        "mlp tanh 64-256-256-10": SharedHeadClassifier(tanh, 256, 10),
    }


def _start_ms(folder: Path, threads: int) -> float:
    times = []
    for _ in range(5):
        start = time.perf_counter()
        EdgeLearner(folder, threads=threads)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bench_model(name: str, net: nn.Module, repeats: int, root: Path, threads: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    model = get_softmask_model(net, SoftMaskConfig(head_modules=["head"]))
    params = dict(net.named_parameters())
    model.begin_task(0)
    model.store.close({n: torch.rand_like(params[n]) for n in model.masked_parameter_names})
    folders = {
        "ort": root / "ort",
        "et": root / "et",
        "et_xnn": root / "et_xnn",
    }
    export_for_device(model, x, folders["ort"])
    export_for_device(model, x, folders["et"], runtime="executorch", xnnpack=False)
    try:
        export_for_device(model, x, folders["et_xnn"], runtime="executorch", xnnpack=True)
        xnn_error = ""
    except ConfigError as e:  # XNNPACK refuses some joint graphs (pass-through tensors)
        del folders["et_xnn"]
        xnn_error = str(e)[:200]
    batch = (x.numpy(), y.numpy())
    steps = {}
    for key, folder in folders.items():
        learner = EdgeLearner(folder, threads=threads)
        learner.learn_task([batch], lr=0.01)  # builds the session and the task's optimizer
        feeds = learner._feeds(batch, 1, cross_head=False)
        steps[key] = lambda r=learner._runtime, f=feeds: r.train_step(f)
    model.begin_task(1)
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = SoftMaskOptimizer(torch.optim.SGD(trainable, lr=0.01), model)

    def torch_step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    timed = paired_medians([torch_step, *steps.values()], repeats)
    t_torch, t_ort, t_et = timed[:3]
    t_xnn = timed[3] if len(timed) > 3 else float("nan")
    size = lambda p: (p).stat().st_size / 1024  # noqa: E731
    et, ort = folders["et"], folders["ort"]
    return {
        "model": name,
        "torch_ms": 1e3 * t_torch,
        "ort_ms": 1e3 * t_ort,
        "et_ms": 1e3 * t_et,
        "et_xnn_ms": 1e3 * t_xnn,
        "et/torch": t_et / t_torch,
        "et_xnn/torch": t_xnn / t_torch,
        "et/ort": t_et / t_ort,
        "et_xnn/ort": t_xnn / t_ort,
        "pte_kib": size(et / "training_program.pte"),
        "pte_xnn_kib": size(folders["et_xnn"] / "training_program.pte") if not xnn_error else 0.0,
        "ptd_kib": size(et / "training_program.ptd"),
        "eval_pte_kib": size(et / "eval_program.pte"),
        "inference_pte_kib": size(et / "inference_program.pte"),
        "onnx_graphs_kib": sum(size(ort / n) for n in EdgeLearner(ort).manifest.static_files()),
        "et_start_ms": _start_ms(et, threads),
        "et_xnn_start_ms": _start_ms(folders["et_xnn"], threads) if not xnn_error else 0.0,
        "xnnpack_error": xnn_error,
        "ort_start_ms": _start_ms(ort, threads),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT threads")
    parser.add_argument("--out", default="results/bench_executorch_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, net) in enumerate(_models().items()):
            rows.append(bench_model(name, net, args.repeats, Path(tmp) / str(i), args.threads))
    print_table(rows, ["model", "torch_ms", "ort_ms", "et_ms", "et_xnn_ms", "et/torch",
                       "et_xnn/torch", "et/ort", "et_xnn/ort"])  # fmt: skip
    print_table(rows, ["model", "pte_kib", "pte_xnn_kib", "ptd_kib", "eval_pte_kib",
                       "inference_pte_kib", "onnx_graphs_kib", "et_start_ms",
                       "et_xnn_start_ms", "ort_start_ms"])  # fmt: skip
    write_json(args.out, "executorch_step", rows)


if __name__ == "__main__":
    main()
