"""Every Python code block of README.md and docs/**/*.md runs; the site builds with --strict.

Markers, an HTML comment on the line before a ```python fence (blank lines between allowed):

* `<!-- docs-test: slow -->`: the block runs under `pytest -m slow` only;
* `<!-- docs-test: skip PATH reason -->`: the block is a sketch of the script or test at PATH
  (which must exist and is what a test runs); the block itself is not run.

Pages added later (docs/guides/*.md, ...) are picked up without editing this file. Each block
runs alone in a fresh interpreter, in an empty folder, offline.
"""

from __future__ import annotations

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


def _param(block: Block):
    marks = [pytest.mark.slow] if block.kind == "slow" else []
    if block.kind == "skip":
        marks = [pytest.mark.skip(reason=f"sketch of {block.note}")]
    return pytest.param(block, id=block.id, marks=marks)


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


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_code_block_runs(block: Block, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", block.code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{block.id} failed:\n{done.stderr[-3000:]}"


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
