"""One side of the save/load stress test (tests/test_concurrency.py), in its own process.

usage: python concurrency_worker.py write|read DIRECTORY SECONDS
write: saves two different checkpoints (A: one task, B: two tasks, other weights) into
DIRECTORY, alternately, for SECONDS. read: loads DIRECTORY for SECONDS and prints one JSON
line: how many loads came back complete-A, complete-B, mixed (weights of one, importance or
task log of the other), or as which exception.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import run_tasks, small_mlp  # noqa: E402

from softmask_peft import SoftMaskConfig, SoftMaskError, SoftMaskModel, get_softmask_model  # noqa: E402


def versions() -> dict[str, SoftMaskModel]:
    """A and B, built deterministically in each process (same bytes on both sides)."""
    torch.manual_seed(0)
    a = run_tasks(get_softmask_model(small_mlp(seed=0, in_features=6), SoftMaskConfig()), 1)
    b = run_tasks(get_softmask_model(small_mlp(seed=1, in_features=6), SoftMaskConfig()), 2)
    return {"A": a, "B": b}


def which(model: SoftMaskModel, known: dict[str, SoftMaskModel]) -> str:
    """The version each part of a loaded model comes from; 'mixed' when they disagree."""
    weights = {k for k, m in known.items() if torch.equal(model.base_model.fc1.weight, m.base_model.fc1.weight)}
    importance = {
        k for k, m in known.items()
        if model.num_tasks == m.num_tasks
        and torch.equal(model.importance["fc1.weight"], m.importance["fc1.weight"])
        and model.task_log == m.task_log
    }
    if len(weights) == 1 and weights == importance:
        return weights.pop()
    return "mixed"


def main() -> None:
    mode, directory, seconds = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    torch.set_num_threads(1)
    known = versions()
    if mode == "write":
        known["A"].save_pretrained(directory)  # the folder holds a checkpoint before any load
    else:
        while not (directory / "model.safetensors").exists():
            time.sleep(0.01)
        SoftMaskModel.from_pretrained(small_mlp(in_features=6), directory)  # imports peft once
    (directory.parent / f"ready.{mode}").touch()  # start together: imports take seconds here
    while not all((directory.parent / f"ready.{m}").exists() for m in ("write", "read")):
        time.sleep(0.01)
    end = time.monotonic() + seconds
    counts: Counter[str] = Counter()
    while time.monotonic() < end:
        if mode == "write":
            for name in ("A", "B"):
                known[name].save_pretrained(directory)
                counts["saves"] += 1
            continue
        try:
            counts[which(SoftMaskModel.from_pretrained(small_mlp(in_features=6), directory), known)] += 1
        except SoftMaskError as e:
            counts[f"library:{type(e).__name__}"] += 1
        except Exception as e:  # noqa: BLE001  (what the test must never see)
            counts[f"raw:{type(e).__name__}:{e}"[:200]] += 1
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
