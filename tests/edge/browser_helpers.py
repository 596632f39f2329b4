"""Browser-test helpers: the demo module's server and page runner, plus checks that fail.

Chromium is Debian's `chromium` (or $CHROMIUM), driven by playwright-core from
export/js/node_modules (`npm ci` there; its postinstall patches onnxruntime-web). Missing
pieces fail the test with the install command: the browser test must fail, not skip.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from softmask_bench.browser_demo import (  # noqa: F401 (re-exported for the tests)
    JS_DIR,
    page_batches,
    run_page,
    serve,
    site,
)


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


def write_case(folder: Path, artifacts: Path, batches, *, epochs: int, lr: float, **extra) -> None:
    """artifacts/ + data.json (numpy (x, y) batches) for test/learn.html-style pages."""
    shutil.copytree(artifacts, folder / "artifacts")
    data = {"input": "input", "batches": page_batches(batches), "epochs": epochs, "lr": lr}
    (folder / "data.json").write_text(json.dumps({**data, **extra}))
