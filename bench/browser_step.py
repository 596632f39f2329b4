"""Device training step in the browser (onnxruntime-web) vs the Python learner.

Same artifacts (shared-head MLPs, soft-masked SGD, importance random in [0, 1]), same batch:
the JS learner in a Web Worker of headless Chromium (export/js/test/step.html) and
`EdgeLearner` with 1 intra-op thread both run `learnTask` / `learn_task` over one batch for
`repeats` epochs per round; the median over rounds of (round time / repeats) is the time of
one train + optimizer step (a round also reads the weights back once; same on both sides).
`--isolated` serves the page cross-origin isolated (COOP/COEP), so the worker runs wasm
threads (min(4, cores)); the Python learner then gets as many intra-op threads. The table also
gives the first-session cost (worker, wasm, first session and one step).

The "products" columns time the step's matrix products alone (per layer: X·W, Xᵀ·G and, past
the first layer, G·Wᵀ, as plain MatMul nodes with operands laid out beforehand, in one inference
graph, 1 thread on both sides): the arithmetic a step cannot skip, on the wasm SIMD128 and the
native kernels of the same onnxruntime release. When the browser's products alone take over 2×
the Python learner's whole step, no change to the learner can bring the step within 2×.
Needs chromium and `npm ci` in export/js.
Run: python bench/browser_step.py --out results/bench_browser_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import print_table, write_json
from softmask_edge import EdgeLearner
from torch import nn

from softmask_peft import SoftMaskConfig, get_softmask_model
from softmask_peft.device import export_for_device
from softmask_peft.testing import seed_importance

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "edge"))
from browser_helpers import run_page, serve, site, write_case  # noqa: E402

IN_FEATURES, CLASSES, BATCH = 64, 10, 32


def _mlp(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, CLASSES),
    )


def _python_ms(
    artifacts: Path, batch, lr: float, warmup: int, rounds: int, repeats: int, threads: int = 1
) -> float:
    learner = EdgeLearner(artifacts, threads=threads)
    learner.learn_task([batch], epochs=warmup, lr=lr)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        learner.learn_task([batch], epochs=repeats, lr=lr)
        times.append((time.perf_counter() - start) / repeats)
    return 1e3 * statistics.median(times)


def _products_graph(hidden: int) -> tuple[bytes, dict[str, list[int]]]:
    """ONNX graph of one training step's matrix products of `_mlp(hidden)` at batch BATCH, each
    a plain MatMul with its operands already laid out (no transposes): the step's arithmetic
    at the kernels' best."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    sizes = [IN_FEATURES, hidden, hidden, CLASSES]
    rng = np.random.default_rng(0)
    nodes, outputs, dims = [], [], {}
    inits = [numpy_helper.from_array(np.array([v, v], np.int64), n) for n, v in (("zero", 0), ("one", 1))]
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        w = (rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(w.T.copy(), f"wt{i}")]
        dims |= {f"x{i}": [BATCH, n_in], f"xt{i}": [n_in, BATCH], f"g{i}": [BATCH, n_out]}
        products = [("y", f"x{i}", f"w{i}"), ("dw", f"xt{i}", f"g{i}")]  # forward, weight grad
        if i:  # the input's gradient (the first layer's input needs none)
            products.append(("dx", f"g{i}", f"wt{i}"))
        for out, a, b in products:  # one element out: no product is copied to JS or numpy
            nodes.append(helper.make_node("MatMul", [a, b], [f"{out}{i}"]))
            nodes.append(helper.make_node("Slice", [f"{out}{i}", "zero", "one"], [f"{out}{i}_"]))
            outputs.append(helper.make_tensor_value_info(f"{out}{i}_", TensorProto.FLOAT, [1, 1]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in dims.items()]
    graph = helper.make_graph(nodes, "products", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString(), dims


def _python_products_ms(graph: bytes, dims, warmup: int, rounds: int, repeats: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {n: rng.uniform(-0.5, 0.5, size=d).astype(np.float32) for n, d in dims.items()}
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            session.run(None, feeds)
        times.append((time.perf_counter() - start) / repeats)
    return 1e3 * statistics.median(times)


def bench(hidden: int, root: Path, args: argparse.Namespace) -> dict[str, object]:
    net = _mlp(hidden)
    model = get_softmask_model(net, SoftMaskConfig(head_modules=["4"]))
    params = dict(net.named_parameters())
    model.begin_task(0)
    seed_importance(model, {n: torch.rand_like(params[n]) for n in model.masked_parameter_names})
    artifacts = root / "artifacts"
    export_for_device(model, torch.randn(2, IN_FEATURES), artifacts)
    rng = np.random.default_rng(0)
    batch = (
        rng.normal(size=(BATCH, IN_FEATURES)).astype(np.float32),
        rng.integers(0, CLASSES, BATCH).astype(np.int64),
    )
    timing = dict(warmup=args.warmup, rounds=args.rounds, repeats=args.repeats)
    served = site(root / "site")
    write_case(served / "case", artifacts, [batch], epochs=1, lr=0.01, **timing)
    with serve(served, isolated=args.isolated) as base:
        result = run_page(f"{base}/js/test/step.html?case=/case/", root / "out", timeout_s=600)
    python_ms = _python_ms(artifacts, batch, 0.01, **timing, threads=result["threads"])
    graph, dims = _products_graph(hidden)
    (served / "case" / "gemm.onnx").write_bytes(graph)
    (served / "case" / "gemm.json").write_text(json.dumps({"inputs": dims, **timing}))
    with serve(served) as base:
        products = run_page(f"{base}/js/test/gemm.html?case=/case/", root / "out", timeout_s=600)
    products_py = _python_products_ms(graph, dims, **timing)
    return {
        "model": f"mlp {IN_FEATURES}-{hidden}-{hidden}-{CLASSES} b{BATCH}",
        "params": sum(p.numel() for p in net.parameters()),
        "threads": result["threads"],
        "browser_ms": result["msPerStep"],
        "python_ms": python_ms,
        "browser/python": result["msPerStep"] / python_ms,
        "first_session_ms": result["firstMs"],
        "products_browser_ms": products["msPerRun"],
        "products_python_ms": products_py,
        "products browser/python": products["msPerRun"] / products_py,
        "products browser / python step": products["msPerRun"] / python_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--isolated", action="store_true", help="COOP/COEP: wasm threads")
    parser.add_argument("--out", default="results/bench_browser_step.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for hidden in args.hidden:
            rows.append(bench(hidden, Path(tmp) / str(hidden), args))
    print_table(rows, list(rows[0]))
    write_json(args.out, "browser_step", rows)


if __name__ == "__main__":
    main()
