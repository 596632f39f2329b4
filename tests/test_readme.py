"""The README's quick start runs when pasted into a fresh interactive interpreter."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

PASTE = """
import code, sys
console = code.InteractiveConsole()
more = False
for line in sys.stdin.read().splitlines():
    more = console.push(line)
if more:
    console.push("")
"""


def quick_start() -> str:
    section = README.read_text().split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_quick_start_runs_when_pasted(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", PASTE],
        input=quick_start(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    accuracies = re.findall(r"after task 2: test accuracy per task \[(.*)\]", done.stdout)
    assert accuracies, done.stdout[-2000:]
    assert all(float(a) > 0.8 for a in accuracies[0].split(","))  # no task forgotten
    assert (tmp_path / "quickstart_run" / "softmask_importance.safetensors").is_file()
    assert "num_classes=2), TaskRecord(name='task_2', num_classes=2)) 3" in done.stdout
