"""The README's and the site's headline plots, drawn from the benchmark JSON in docs/results.

    python bench/plots.py            # writes docs/images/split_digits_matrix.png, acc_forgetting.png

Reads only stored results (no training): `softmask-peft bench ... --out docs/results/float32`
wrote them (commands in docs/benchmarks/accuracy.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "float32"
BENCHMARKS = {
    "Split-Digits (task-il)": "split-digits_task_mlp.json",
    "Permuted-Digits (domain-il)": "permuted-digits_domain_mlp.json",
    "Split-MNIST1D (task-il)": "split-mnist1d_task_mlp.json",
}
METHODS = ("spg", "finetune", "ewc", "joint")


def mean_matrix(report: dict, method: str) -> np.ndarray:
    """Mean over seeds of R[i][j] (NaN where task j is not learned yet)."""
    runs = [r["matrix"] for r in report["runs"] if r["method"] == method]
    return np.nanmean(np.array(runs, dtype=float), axis=0)


def matrix_plot(out: Path) -> None:
    report = json.loads((RESULTS / BENCHMARKS["Split-Digits (task-il)"]).read_text())
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    for ax, method, title in zip(axes, ("spg", "finetune"), ("SPG", "fine-tuning")):
        m = mean_matrix(report, method)
        for j in range(m.shape[1]):
            ax.plot(range(j, m.shape[0]), m[j:, j], marker="o", label=f"task {j}")
        ax.set_title(f"{title} (mean of 3 seeds)")
        ax.set_xlabel("after training task")
        ax.set_xticks(range(m.shape[0]))
    axes[0].set_ylabel("test accuracy on task j (%)")
    axes[1].legend(fontsize=8, loc="lower left")
    fig.suptitle("Split-Digits, task-incremental: accuracy of each task as later tasks are learned")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def acc_forgetting_plot(out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    width = 0.2
    names = list(BENCHMARKS)
    for k, method in enumerate(METHODS):
        accs, accs_std, fgt, fgt_std = [], [], [], []
        for name in names:
            s = json.loads((RESULTS / BENCHMARKS[name]).read_text())["summary"].get(method, {})
            accs.append(s.get("acc", {}).get("mean", np.nan))
            accs_std.append(s.get("acc", {}).get("std", 0.0))
            fgt.append((s.get("forgetting") or {}).get("mean", np.nan))
            fgt_std.append((s.get("forgetting") or {}).get("std", 0.0))
        x = np.arange(len(names)) + (k - 1.5) * width
        label = "ewc (λ selected)" if method == "ewc" else method
        axes[0].bar(x, accs, width, yerr=accs_std, label=label)
        axes[1].bar(x, fgt, width, yerr=fgt_std, label=label)
    for ax, label in zip(axes, ("ACC (%) ↑", "Forgetting (points) ↓")):
        ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle("SPG paper's protocol, MLP, 3 seeds (mean ± std; joint has no forgetting)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    matrix_plot(out / "split_digits_matrix.png")
    acc_forgetting_plot(out / "acc_forgetting.png")
    print(f"wrote {out}/split_digits_matrix.png, {out}/acc_forgetting.png")


if __name__ == "__main__":
    main()
