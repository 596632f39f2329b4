"""Start-up cost: `import softmask_peft` and `softmask-peft --help` against `import torch`.

    python bench/import_time.py                      # 9 alternating rounds
    python bench/import_time.py --rounds 3 --out docs/results/bench/bench_import_time.json

Each round runs every command once, in a fresh interpreter, in turn, so a busy machine slows
all of them alike; the table gives each command's median wall time and its ratio to
`python -c "import torch"` (the issue's target: <= 1.5x). The rows:

* `import softmask_peft`: the package (its API classes load on first use);
* `from softmask_peft import ...`: the package and its whole API (model, optimizer, config);
* `softmask-peft --help`: the command line, entry-point discovery of the installed commands
  included (the console script if it is on PATH, else `python -m softmask_peft`).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BASELINE = "import torch"


def commands() -> dict[str, list[str]]:
    """Label -> argv, the baseline first."""
    py = sys.executable
    script = shutil.which("softmask-peft", path=str(Path(py).parent)) or shutil.which(
        "softmask-peft"
    )
    help_cmd = [script, "--help"] if script else [py, "-m", "softmask_peft", "--help"]
    return {
        BASELINE: [py, "-c", "import torch"],
        "import softmask_peft": [py, "-c", "import softmask_peft"],
        "from softmask_peft import API": [
            py,
            "-c",
            "from softmask_peft import SoftMaskConfig, SoftMaskModel, SoftMaskOptimizer",
        ],
        "softmask-peft --help": help_cmd,
    }


def wall_time(argv: list[str]) -> float:
    """Seconds from spawn to exit of one run (output discarded; a failure stops the benchmark)."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(rounds: int) -> list[dict]:
    """Median wall time of each command over `rounds` alternating rounds (one warm-up round)."""
    cmds = commands()
    times: dict[str, list[float]] = {label: [] for label in cmds}
    for r in range(rounds + 1):
        for label, argv in cmds.items():
            t = wall_time(argv)
            if r:  # round 0 warms the file cache
                times[label].append(t)
    base = statistics.median(times[BASELINE])
    return [
        {
            "command": label,
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "ratio_to_torch": statistics.median(ts) / base,
            "argv": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(cmds[label])),
        }
        for label, ts in times.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="default: %(default)s")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("docs/results/bench/bench_import_time.json"),
        help="JSON output (default: %(default)s)",
    )
    args = parser.parse_args()
    rows = measure(args.rounds)
    print("| command | median s | min s | x import torch |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| `{row['command']}` | {row['median_s']:.3f} | {row['min_s']:.3f} "
            f"| {row['ratio_to_torch']:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "import_time",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "rounds": args.rounds,
        "rows": rows,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
