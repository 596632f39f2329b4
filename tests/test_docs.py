"""Every Python code block of README.md and docs/**/*.md runs; the site builds with --strict.

Markers, an HTML comment on the line before a ```python fence (blank lines between allowed):

* `<!-- docs-test: slow -->`: the block runs under `pytest -m slow` only;
* `<!-- docs-test: skip PATH reason -->`: the block is a sketch of the script or test at PATH
  (which must exist and is what a test runs); the block itself is not run.

Pages added later (docs/guides/*.md, ...) are picked up without editing this file. Each block
runs in a fresh namespace and an empty folder, offline; one interpreter per page and kind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^([ \t]*)```(\w*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*docs-test:\s*(\w+)\s*(.*?)\s*-->\s*$")
KINDS = ("run", "slow", "skip")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    code: str
    kind: str  # run, slow or skip
    note: str  # a skip's "PATH reason"

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(page: Path) -> list[Block]:
    """The ```python blocks of a page, each with the marker written just before it."""
    text = page.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        if m.group(2) not in ("python", "py"):
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        kind, note = (marker.group(1), marker.group(2)) if marker else ("run", "")
        code = textwrap.dedent(m.group(3))
        blocks.append(Block(page, text.count("\n", 0, m.start()) + 1, code, kind, note))
    return blocks


BLOCKS = [b for page in markdown_pages() for b in python_blocks(page)]


# One interpreter per page and kind runs that page's blocks in order, each in a fresh
# namespace and its own empty folder (torch and transformers are imported once per page, not
# once per block); a failure names the block.
# With SOFTMASK_WITHOUT_ONNX_RUNTIME=1 (a Python with no ONNX Runtime Training build, see
# conftest.py) a block that needs it must stop with the library's RuntimeUnavailableError, no
# other error: it is reported as such and the page's next blocks still run.
RUNNER = """
import json, os, sys, time, traceback
without_onnx = os.environ.get("SOFTMASK_WITHOUT_ONNX_RUNTIME") == "1"
for block in json.load(sys.stdin):
    start = time.perf_counter()
    os.makedirs(block["dir"])
    os.chdir(block["dir"])
    try:
        exec(compile(block["code"], block["id"], "exec"), {"__name__": "__main__"})
    except BaseException as e:
        if without_onnx and f"{type(e).__module__}.{type(e).__name__}" == (
            "softmask_edge.errors.RuntimeUnavailableError"
        ):
            print(f"BLOCK NEEDS ONNX RUNTIME: {block['id']}: {e}", flush=True)
            continue
        print(f"BLOCK FAILED: {block['id']}", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
    print(f"BLOCK OK: {block['id']} ({time.perf_counter() - start:.1f} s)", flush=True)
"""


def _groups() -> list:
    """(page, kind) groups of runnable blocks; slow groups carry the slow mark."""
    groups: dict[tuple[str, str], list[Block]] = {}
    for block in BLOCKS:
        if block.kind in ("run", "slow"):
            groups.setdefault((str(block.page.relative_to(ROOT)), block.kind), []).append(block)
    return [
        pytest.param(
            blocks, id=f"{page}[{kind}]", marks=[pytest.mark.slow] if kind == "slow" else []
        )
        for (page, kind), blocks in groups.items()
    ]


def test_every_marker_is_known_and_every_skip_names_what_runs_instead():
    counts = dict.fromkeys(KINDS, 0)
    for block in BLOCKS:
        assert block.kind in KINDS, f"{block.id}: unknown docs-test marker {block.kind!r}"
        counts[block.kind] += 1
        if block.kind == "skip":
            path = block.note.split(" ", 1)[0]
            assert path and (ROOT / path).exists(), (
                f"{block.id}: a skipped block must name the tested script it sketches, got "
                f"{block.note!r}"
            )
    print("docs code blocks:", counts)
    assert counts["run"] >= 6  # the README's snippets at least


@pytest.mark.parametrize("blocks", _groups())
def test_code_blocks_run(blocks: list[Block], tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    todo = [
        {"id": b.id, "code": b.code, "dir": str(tmp_path / f"block{i}")}
        for i, b in enumerate(blocks)
    ]
    done = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(todo),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ran, refused = done.stdout.count("BLOCK OK: "), done.stdout.count("BLOCK NEEDS ONNX RUNTIME: ")
    assert ran + refused == len(blocks), done.stdout[-2000:]
    print("".join(line + "\n" for line in done.stdout.splitlines() if line.startswith("BLOCK ")))


def test_the_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    assert mkdocs, "mkdocs is not installed: pip install -e '.[docs]' (the dev extra has it)"
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    for page in ("index.html", "guides/methods/index.html", "reference/softmask_peft/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "reference" / "softmask_peft" / "index.html").read_text()
    assert "SoftMaskOptimizer" in api and "begin_task" in api  # docstrings rendered


def test_the_runner_names_a_failing_block(tmp_path):
    todo = [
        {"id": "page.md:1", "code": "x = 1", "dir": str(tmp_path / "a")},
        {"id": "page.md:9", "code": "assert x == 1", "dir": str(tmp_path / "b")},  # fresh namespace
    ]
    done = subprocess.run(
        [sys.executable, "-c", RUNNER], input=json.dumps(todo), capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "BLOCK OK: page.md:1" in done.stdout and "BLOCK FAILED: page.md:9" in done.stderr


# pages other branches add (trainer-trl, avalanche, executorch, browser): the README links them
# already; once they exist this list changes nothing and can go
PENDING_PAGES = {
    "docs/guides/trainer-trl.md",
    "docs/guides/avalanche.md",
    "docs/guides/executorch.md",
    "docs/guides/browser.md",
}


def test_the_readmes_relative_links_resolve():
    """The README is not part of the site (its links point into docs/): check them here."""
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link.split("#")[0] for link in links if "://" not in link and not link.startswith("#")]
    assert len(local) >= 10
    missing = [link for link in local if not (ROOT / link).exists() and link not in PENDING_PAGES]
    assert missing == []
