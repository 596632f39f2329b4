"""The README's test command asks apt only for what is missing (issue 19, class 11): with
Node.js from another source (npm present) and no Chromium, `apt-get install chromium nodejs
npm` is refused by apt (`nodejs : Conflicts: npm`), so the command must ask for chromium alone.

The command's install step runs in bash with a PATH holding only stand-ins for the programs
(`apt-get` records its arguments; `chromium` / `npm` exist or not), never the real apt.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def install_step() -> str:
    """The part of the README's test command between the pip installs and `npm ci`."""
    line = next(
        ln for ln in README.read_text(encoding="utf-8").splitlines()
        if ln.startswith("python3 -m venv") and "pytest -q" in ln
    )
    match = re.search(r'pip install -e "\.\[dev\]" && (.*) && \(cd export/js', line)
    assert match, line
    return match.group(1)


@pytest.mark.parametrize(
    "present, expected",
    [
        ({"npm"}, ["update", "install -y chromium"]),
        ({"chromium"}, ["update", "install -y nodejs npm"]),
        (set(), ["update", "install -y chromium nodejs npm"]),
        ({"chromium", "npm"}, []),
    ],
    ids=["npm-only", "chromium-only", "neither", "both"],
)
def test_the_readme_installs_only_what_is_missing(tmp_path, present, expected):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt.log"
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    for name in present:
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
    for tool in ("xargs", "echo"):
        if shutil.which(tool):
            os.symlink(shutil.which(tool), bin_dir / tool)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    bash = shutil.which("bash")
    result = subprocess.run(
        [bash, "-c", install_step()], env={"PATH": str(bin_dir)}, capture_output=True,
        text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    assert calls == expected
