"""Loads while another process saves (issue 19, class 1): every load is complete-old,
complete-new or a library error, never weights of one save with importance of another.

Writer and reader are separate processes on one folder; the default run takes a few seconds,
`-m slow` runs a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "concurrency_worker.py"


def stress(directory: Path, seconds: float) -> tuple[dict, dict]:
    def start(mode: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(WORKER), mode, str(directory), str(seconds)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    writer, reader = start("write"), start("read")
    try:
        outs = [p.communicate(timeout=seconds + 120) for p in (writer, reader)]
    finally:
        for p in (writer, reader):
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip((writer, reader), outs):
        assert p.returncode == 0, err[-3000:]
    return json.loads(outs[0][0].splitlines()[-1]), json.loads(outs[1][0].splitlines()[-1])


def check(written: dict, loads: dict) -> None:
    print(written, loads)
    raw = {k: n for k, n in loads.items() if k.startswith("raw:")}
    assert not raw, raw  # only library errors
    assert loads.get("mixed", 0) == 0, loads
    assert written["saves"] >= 10, written  # the saves really overlapped the loads
    assert loads.get("A", 0) + loads.get("B", 0) >= 5, loads


def test_loads_during_saves_are_never_mixed(tmp_path):
    written, loads = stress(tmp_path / "ckpt", seconds=2.0)
    check(written, loads)


@pytest.mark.slow
def test_loads_during_saves_are_never_mixed_for_a_minute(tmp_path):
    written, loads = stress(tmp_path / "ckpt", seconds=60.0)
    check(written, loads)
