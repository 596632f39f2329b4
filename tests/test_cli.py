"""The core `softmask-peft` command: cheap help, and a clear message when no command is installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import softmask_format

import softmask_peft

# the source folders of softmask_peft and softmask_format, for an interpreter without site-packages

HELP_SCRIPT = """
import json, sys
from softmask_peft.cli import main
try:
    main(["--help"])
except SystemExit as e:
    code = e.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "numpy", "transformers", "peft"})
print(json.dumps({"code": code, "heavy": heavy}))
"""


def test_help_imports_no_heavy_package() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", HELP_SCRIPT], capture_output=True, text=True, check=True
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}
    assert "soft-masking" in proc.stdout


def _without_site_packages(*args: str) -> subprocess.CompletedProcess:
    """`python -S -m softmask_peft ...` on a copy of the two packages and nothing else (no
    site-packages, no install metadata beside the sources), so no command is installed."""
    source = Path(tempfile.mkdtemp(prefix="softmask-cli-"))
    for m in (softmask_peft, softmask_format):
        package = Path(m.__file__).resolve().parent
        shutil.copytree(package, source / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(source)}
    return subprocess.run(
        [sys.executable, "-S", "-m", "softmask_peft", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=source,  # `-m` puts the working directory first on sys.path
    )


def test_demo_without_commands_says_how_to_install_them() -> None:
    proc = _without_site_packages("demo")
    assert proc.returncode == 2
    assert "'demo'" in proc.stderr and 'pip install "softmask-peft[bench]"' in proc.stderr


def test_help_without_commands_says_how_to_install_them() -> None:
    proc = _without_site_packages("--help")
    assert proc.returncode == 0
    assert 'pip install "softmask-peft[bench]"' in proc.stdout
