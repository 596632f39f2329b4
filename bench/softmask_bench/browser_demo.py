"""The browser demo: a web page keeps learning Split-Digits without forgetting.

Tasks 0..k-1 are learned with SPG in PyTorch (as `device_demo`), exported with one declared
head per remaining task, and served with the JS learner (export/js, onnxruntime-web) from
127.0.0.1. The page `export/js/demo/index.html` evaluates the learned tasks, learns the
remaining ones itself (soft-masked, validation split with early stopping, importance pass)
and shows the accuracy matrix R[i][j] before and after. Needs a source checkout with
`npm ci` run in export/js; the headless run also needs Chromium.

The server and page-runner helpers here are shared with the browser test and benchmark.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from softmask_peft.device import export_for_device
from softmask_peft.errors import ConfigError

from .benchmarks import Split, get_benchmark
from .device_demo import _torch_part
from .training import TrainConfig

JS_DIR = Path(__file__).resolve().parents[2] / "export" / "js"


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".mjs": "text/javascript",
        ".js": "text/javascript",
        ".wasm": "application/wasm",
        ".json": "application/json",
    }

    isolated = False  # send COOP/COEP: the page is cross-origin isolated (wasm threads)

    def end_headers(self) -> None:
        if self.isolated:
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(root: Path, port: int = 0, isolated: bool = False) -> Iterator[str]:
    """Serve `root` on 127.0.0.1 only (port 0: a free one) in a thread; yields the base URL.

    `isolated` sends the COOP/COEP headers that make pages cross-origin isolated, which
    onnxruntime-web needs for more than one wasm thread."""
    handler = type("Handler", (_Handler,), {"isolated": isolated})
    server = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(handler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def js_requirements(need_browser: bool = True) -> tuple[str | None, str]:
    """(chromium, node); ConfigError naming what is missing and how to install it."""
    missing = []
    if not (JS_DIR / "node_modules" / "onnxruntime-web").is_dir():
        missing.append(f"the JS packages: run `npm ci` in {JS_DIR} (a source checkout)")
    node = shutil.which("node")
    if node is None:
        missing.append("node: apt-get install -y nodejs npm")
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if need_browser and chromium is None:
        missing.append("chromium: apt-get install -y chromium")
    if missing:
        raise ConfigError("the browser learner needs " + "; ".join(missing))
    return chromium, node


def site(root: Path) -> Path:
    """A folder to serve, with export/js linked in as /js."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "js").symlink_to(JS_DIR, target_is_directory=True)
    return root


def page_batches(batches: Sequence[tuple[np.ndarray, np.ndarray] | dict]) -> list[dict]:
    """numpy batches as the pages read them: (x, y) as flat x, dims, labels; a dict batch
    ({input name: array, "labels": array}) as {inputs: {name: {data, dims, dtype}}, y}."""
    out = []
    for batch in batches:
        if isinstance(batch, dict):
            inputs = {
                k: {"data": np.asarray(v).ravel().tolist(), "dims": list(np.shape(v)),
                    "dtype": str(np.asarray(v).dtype)}
                for k, v in batch.items() if k != "labels"
            }  # fmt: skip
            out.append({"inputs": inputs, "y": np.asarray(batch["labels"]).tolist()})
        else:
            x, y = batch
            out.append({"x": np.asarray(x, np.float32).ravel().tolist(), "dims": list(x.shape),
                        "y": y.tolist()})  # fmt: skip
    return out


def run_page(
    url: str,
    out: Path,
    timeout_s: float = 60,
    screenshot: Path | None = None,
    runner: str = "run-page.mjs",
) -> dict:
    """Open `url` in headless Chromium (export/js/test/run-page.mjs); return window.__result.

    Files the page returns (base64) are written into `out`; the page's and its workers'
    console lines are under "console"; `screenshot`: a PNG of the finished page. `runner`:
    another driver in export/js/test taking the same arguments (run-tabs.mjs: two tabs).
    """
    chromium, node = js_requirements()
    proc = subprocess.run(
        [
            node,
            str(JS_DIR / "test" / runner),
            url,
            str(out),
            chromium,
            str(int(timeout_s * 1000)),
            *([str(Path(screenshot).resolve())] if screenshot else []),
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s + 30,
        cwd=JS_DIR,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the page {url} failed:\n{proc.stderr[-4000:]}")
    result = json.loads((out / "result.json").read_text())
    tagged = ("[page ", "[tab ")
    result["console"] = [line for line in proc.stderr.splitlines() if line.startswith(tagged)]
    return result


def _split_batches(split: Split, size: int) -> list[dict]:
    x, y = split.x.numpy(), split.y.numpy()
    return page_batches([(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)])


def run_browser_demo(
    torch_tasks: int = 4,
    *,
    seed: int = 0,
    train_config: TrainConfig | None = None,
    headless: bool = True,
    port: int = 0,
    workdir: str | Path | None = None,
    screenshot: str | Path | None = None,
) -> dict:
    """Learn `torch_tasks` Split-Digits tasks in PyTorch, the rest in the browser.

    headless: run the page in headless Chromium and return {"before", "rows"} (the accuracy
    matrix), "progress" (one entry per epoch) and "drawn" (each head's digit for the drawing
    pad's image); otherwise print the URL and serve until interrupted (returns {}).
    screenshot: where to write a PNG of the finished page (headless).
    """
    js_requirements(need_browser=headless)
    cfg = train_config or TrainConfig()
    bench = get_benchmark("split-digits", seed)
    if not 0 < torch_tasks < bench.num_tasks:
        raise ConfigError(f"torch_tasks must be in [1, {bench.num_tasks - 1}], got {torch_tasks}")
    model, torch_rows = _torch_part(bench, torch_tasks, "mlp", cfg, seed, "float32")
    # absolute: the page runner works in export/js, a relative out dir would land there
    root = Path(workdir).resolve() if workdir is not None else Path(tempfile.mkdtemp(prefix="browser_demo."))
    try:
        served = site(root / "site")
        case = served / "case"
        future = [t.num_classes for t in bench.tasks[torch_tasks:]]
        export_for_device(
            model, bench.tasks[0].train.x[:2], case / "artifacts", future_heads=future
        )
        data = {
            "torch_tasks": torch_tasks,
            "torch_rows": torch_rows,
            "epochs": cfg.epochs,
            "lr": cfg.lr,
            "early_stopping": {
                "patience": cfg.patience,
                "lrPatience": cfg.lr_patience,
                "lrFactor": cfg.lr_factor,
                "lrMin": cfg.lr_min,
            },
            "tasks": [
                {
                    "name": t.name,
                    "test": _split_batches(t.test, 256),
                    **(
                        {
                            "train": _split_batches(t.train, cfg.batch_size),
                            "val": _split_batches(t.val, 256),
                        }
                        if k >= torch_tasks
                        else {}
                    ),
                }
                for k, t in enumerate(bench.tasks)
            ],
            "config": asdict(cfg),
        }
        (case / "data.json").write_text(json.dumps(data))
        with serve(served, port) as base:
            url = f"{base}/js/demo/index.html?case=/case/"
            if headless:
                return run_page(url, root / "out", timeout_s=300, screenshot=screenshot)
            print(f"open {url}  (Ctrl-C to stop)", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
            return {}
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
