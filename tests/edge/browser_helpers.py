"""Run a page of export/js in headless Chromium against a 127.0.0.1-only HTTP server.

Used by the browser test and bench/browser_step.py. Chromium is Debian's `chromium` (or
$CHROMIUM), driven by playwright-core from export/js/node_modules (`npm ci` there; its
postinstall patches onnxruntime-web). Missing pieces raise: the browser test must fail, not skip.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

JS_DIR = Path(__file__).resolve().parents[2] / "export" / "js"


def browser_requirements() -> tuple[str, str]:
    """(chromium, node) paths; AssertionError naming what is missing and how to install it."""
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium")
    node = shutil.which("node")
    assert chromium, "chromium is not installed: apt-get install -y chromium (as .ci/run does)"
    assert node, "node is not installed: apt-get install -y nodejs npm"
    for package in ("onnxruntime-web", "playwright-core"):
        assert (JS_DIR / "node_modules" / package).is_dir(), (
            f"{package} is missing: run `npm ci` in {JS_DIR}"
        )
    return chromium, node


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".mjs": "text/javascript",
        ".js": "text/javascript",
        ".wasm": "application/wasm",
        ".json": "application/json",
    }

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@contextlib.contextmanager
def serve(root: Path) -> Iterator[str]:
    """Serve `root` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def site(root: Path) -> Path:
    """A served folder with export/js linked in as /js."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "js").symlink_to(JS_DIR, target_is_directory=True)
    return root


def page_batches(batches) -> list[dict]:
    """numpy (x, y) batches as the test pages read them."""
    return [
        {"x": np.asarray(x, np.float32).ravel().tolist(), "dims": list(x.shape), "y": y.tolist()}
        for x, y in batches
    ]


def write_case(folder: Path, artifacts: Path, batches, *, epochs: int, lr: float, **extra) -> None:
    """artifacts/ + data.json (numpy (x, y) batches) for test/learn.html-style pages."""
    shutil.copytree(artifacts, folder / "artifacts")
    data = {"input": "input", "batches": page_batches(batches), "epochs": epochs, "lr": lr}
    (folder / "data.json").write_text(json.dumps({**data, **extra}))


def run_page(url: str, out: Path, timeout_s: float = 60) -> dict:
    """Open `url` in headless Chromium; return its result (saved files land in `out`)."""
    chromium, node = browser_requirements()
    proc = subprocess.run(
        [
            node,
            str(JS_DIR / "test" / "run-page.mjs"),
            url,
            str(out),
            chromium,
            str(int(timeout_s * 1000)),
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s + 30,
        cwd=JS_DIR,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "result.json").read_text())
