"""Result tables (markdown), JSON and accuracy-matrix heatmaps; every file written atomically.

Metrics are those of `metrics.py` (formulas there); every table states its scenario.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from softmask_format.atomic import atomic_write, atomic_write_text, ensure_directory

from softmask_peft.errors import SaveLocationError

from .benchmarks import SCENARIO_TITLES
from .metrics import mean_std
from .runner import RunResult

METRIC_NOTE = (
    "R[i][j] = test accuracy (%) on task j after training task i. ACC = mean_j R[T-1][j]; "
    "BWT = mean_{j<T-1} (R[T-1][j] - R[j][j]) (Lopez-Paz & Ranzato 2017); "
    "Forgetting = mean_{j<T-1} max_{j<=l<T-1} (R[l][j] - R[T-1][j]) (Chaudhry et al. 2018); "
    "Plasticity = mean_j R[j][j] (each task right after learning it). "
    "Mean ± sample std over seeds. joint trains once on all tasks, so it has only the final row "
    "and no BWT/Forgetting."
)


METRICS = ("acc", "bwt", "forgetting", "plasticity")


def _by_method(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = defaultdict(list)
    for r in results:
        groups[r.method].append(r)
    return dict(groups)


def _fmt(stat: tuple[float, float] | None) -> str:
    return "—" if stat is None else f"{stat[0]:.2f} ± {stat[1]:.2f}"


def mean_matrix(runs: Sequence[RunResult]) -> np.ndarray:
    """Seed-mean accuracy matrix; NaN where a task had not been learned yet."""
    stack = np.array([np.asarray(r.matrix, dtype=np.float64) for r in runs])
    return stack.mean(axis=0)


def summary(results: Sequence[RunResult]) -> dict[str, dict[str, object]]:
    """Per method: mean/std of each metric over seeds, the per-seed values and the mean matrix."""
    out = {}
    for method, runs in _by_method(results).items():
        entry: dict[str, object] = {"seeds": [r.seed for r in runs]}
        for key in METRICS:
            values = [r.metrics.get(key) for r in runs]
            stat = mean_std(values)
            entry[key] = None if stat is None else {"mean": stat[0], "std": stat[1]}
            entry[f"{key}_per_seed"] = values
        entry["per_task_index"] = per_task_index(runs)
        entry["mean_matrix"] = [
            [None if np.isnan(v) else round(float(v), 4) for v in row] for row in mean_matrix(runs)
        ]
        out[method] = entry
    return out


def markdown_report(results: Sequence[RunResult], settings: dict[str, object]) -> str:
    """Metric table (one row per method) and the seed-mean accuracy matrices."""
    first = results[0]
    lines = [
        f"## {first.benchmark} — {SCENARIO_TITLES[first.scenario]}",
        "",
        f"Architecture `{first.arch}`; seeds {sorted({r.seed for r in results})}; "
        + "; ".join(f"{k}={v}" for k, v in settings.items()),
        "",
        "| method | ACC (%) | BWT (points) | Forgetting (points) | Plasticity (%) | ACC per seed "
        "| notes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, runs in _by_method(results).items():
        stats = [mean_std([r.metrics.get(k) for r in runs]) for k in METRICS]
        per_seed = ", ".join(f"{r.metrics['acc']:.2f}" for r in runs)
        notes = "; ".join(f"{k}={v}" for k, v in runs[0].info.items() if k not in ("ewc_lambda_grid", "capacity"))
        if method == "ewc":
            notes = "λ per seed: " + ", ".join(str(r.info.get("ewc_lambda")) for r in runs)
        lines.append(f"| {method} | {' | '.join(_fmt(s) for s in stats)} | {per_seed} | {notes} |")
    lines += ["", METRIC_NOTE, ""]
    lines += _per_index_lines(results)
    for method, runs in _by_method(results).items():
        m = mean_matrix(runs)
        lines += [f"Accuracy matrix R (%), {method}, mean over seeds:", ""]
        lines.append("| after task | " + " | ".join(f"T{j}" for j in range(m.shape[1])) + " |")
        lines.append("| --- " * (m.shape[1] + 1) + "|")
        for i, row in enumerate(m):
            label = "all (joint)" if m.shape[0] == 1 else f"T{i}"
            cells = " | ".join("·" if np.isnan(v) else f"{v:.1f}" for v in row)
            lines.append(f"| {label} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def per_task_index(runs: Sequence[RunResult]) -> dict[str, list[float] | None]:
    """Seed means per task index j: plasticity R[j][j] and, for soft-masked runs, the
    saturation (share of masked values with A > 0.9) and mean keep after task j."""
    m = mean_matrix(runs)
    out: dict[str, list[float] | None] = {
        "plasticity": None if m.shape[0] == 1 else [float(v) for v in np.diag(m)]
    }
    for key in ("saturation", "mean_keep"):
        if all(r.info.get("capacity") for r in runs):
            per_seed = np.array([[c[key] for c in r.info["capacity"]] for r in runs])
            out[key] = [float(v) for v in per_seed.mean(axis=0)]
        else:
            out[key] = None
    return out


def _per_index_lines(results: Sequence[RunResult]) -> list[str]:
    groups = {m: per_task_index(runs) for m, runs in _by_method(results).items()}
    rows = [(m, k, v) for m, g in groups.items() for k, v in g.items() if v is not None]
    if not rows:
        return []
    width = max(len(v) for _, _, v in rows)
    lines = [
        "Per task index j (seed means): plasticity R[j][j] (%); saturation = share of masked "
        "values with A > 0.9 and mean keep = mean(1 - A) after task j (soft-masked methods):",
        "",
        "| method | quantity | " + " | ".join(f"T{j}" for j in range(width)) + " |",
        "| --- | --- " + "| --- " * width + "|",
    ]
    for method, key, values in rows:
        fmt = "{:.1f}" if key == "plasticity" else "{:.2f}"
        lines.append(f"| {method} | {key} | " + " | ".join(fmt.format(v) for v in values) + " |")
    return [*lines, ""]


def plot_curves(results: Sequence[RunResult], path: str | os.PathLike, title: str = "") -> None:
    """Plasticity R[j][j] and saturation against the task index, one line per method (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for method, runs in _by_method(results).items():
        curves = per_task_index(runs)
        if curves["plasticity"] is not None:
            left.plot(curves["plasticity"], marker=".", label=method)
        if curves["saturation"] is not None:
            right.plot(curves["saturation"], marker=".", label=method)
    left.set(xlabel="task index j", ylabel="accuracy on task j right after it (%)")
    left.set_title("plasticity R[j][j]")
    right.set(xlabel="task index j", ylabel="share of masked values with A > 0.9", ylim=(0, 1))
    right.set_title("saturation")
    left.legend(fontsize=8)
    if right.lines:
        right.legend(fontsize=8)
    _save_png(fig, path, title)


def _save_png(fig: Any, path: str | os.PathLike, title: str) -> None:
    """Title, write atomically as a PNG, close (matplotlib keeps every open figure)."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def plot_heatmaps(results: Sequence[RunResult], path: str | os.PathLike, title: str = "") -> None:
    """One heatmap per method of the seed-mean accuracy matrix, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _by_method(results)
    fig, axes = plt.subplots(
        1, len(groups), figsize=(3.6 * len(groups), 4.2), squeeze=False, layout="constrained"
    )
    for ax, (method, runs) in zip(axes[0], groups.items()):
        m = mean_matrix(runs)
        image = ax.imshow(np.ma.masked_invalid(m), vmin=0, vmax=100, cmap="viridis")
        ax.set_title(method)
        ax.set_xlabel("evaluated on task j")
        ax.set_ylabel("after training task i" if m.shape[0] > 1 else "after all tasks")
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        for (i, j), v in np.ndenumerate(m):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="k")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy (%)")
    _save_png(fig, path, title)


def write_report(
    results: Sequence[RunResult], out_dir: str | os.PathLike, settings: dict[str, object]
) -> dict[str, Path]:
    """Write `<stem>.md`, `<stem>.json`, `<stem>.png` (heatmaps) and `<stem>_curves.png`
    (plasticity and saturation per task index) into `out_dir`; return their paths.

    stem = `<benchmark>_<scenario>_<arch>`.
    """
    out = ensure_directory(out_dir, SaveLocationError)
    first = results[0]
    stem = f"{first.benchmark}_{first.scenario}_{first.arch}"
    paths = {ext: out / f"{stem}.{ext}" for ext in ("md", "json", "png")}
    paths["curves"] = out / f"{stem}_curves.png"
    atomic_write_text(paths["md"], markdown_report(results, settings) + "\n")
    payload = {
        "benchmark": first.benchmark,
        "scenario": first.scenario,
        "scenario_description": SCENARIO_TITLES[first.scenario],
        "arch": first.arch,
        "settings": settings,
        "metric_definitions": METRIC_NOTE,
        "summary": summary(results),
        "runs": [r.to_dict() for r in results],
    }
    atomic_write_text(paths["json"], json.dumps(payload, indent=2, allow_nan=False) + "\n")
    title = f"{first.benchmark} ({first.scenario}-incremental)"
    plot_heatmaps(results, paths["png"], title)
    plot_curves(results, paths["curves"], title)
    return paths
