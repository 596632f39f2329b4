"""Where does SPG forget? Per-layer importance and a layer-restore attribution (issue 13, item 6).

Runs SPG (the harness's `spg` strategy, early-stopping protocol) on Split-Digits and keeps the
weights after every task. Then, for every finished task j and every layer group L of the final
model, puts back L's weights as they were right after task j and re-tests task j:

    recovered(L, j) = acc_j(final model with L from after task j) - acc_j(final model)

A large value means the changes to L made after task j are what cost task j its accuracy.
Also prints, per layer and task, the mean accumulated importance A, the fraction of elements
with A >= 0.9 ("saturated") and the relative weight change ||θ_final - θ_j|| / ||θ_j||.

    PYTHONPATH=.:export python bench/spg_layer_forgetting.py --arch cnn --seeds 3 \
        --out docs/results/spgq/cnn_layers.json

`--conv-importance channel` is an experiment, not the library's method: it standardizes the
gradient sums of conv weights per output channel instead of per tensor (the official SPG),
by patching the normalisation SPG calls for the duration of the run.
"""

from __future__ import annotations

import argparse
import copy
import json
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from softmask_bench.benchmarks import get_benchmark
from softmask_bench.runner import _eval_batches, run_sequence
from softmask_bench.strategies import SoftMaskStrategy
from softmask_bench.training import TrainConfig, evaluate

from softmask_peft.importance.normalize import normalize_importance


class SnapshotSPG(SoftMaskStrategy):
    """The harness's SPG, keeping the weights and A after every task."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.weights: list[dict[str, torch.Tensor]] = []
        self.importance: list[dict[str, torch.Tensor]] = []

    def end_task(self, task_id: int, task) -> None:
        super().end_task(task_id, task)
        self.weights.append(copy.deepcopy(self.model.base_model.state_dict()))
        self.importance.append({k: v.clone() for k, v in self.model.importance.items()})


def per_channel_conv(g: torch.Tensor) -> torch.Tensor:
    """Conv weights (ndim >= 3): |tanh(standardize)| per output channel; others per tensor."""
    if g.ndim < 3:
        return normalize_importance(g)
    return normalize_importance(g.reshape(g.shape[0], -1), dim=1).reshape(g.shape)


def layer_of(name: str) -> str:
    """'backbone.features.0.weight' -> 'backbone.features.0'; task heads -> 'head'."""
    return "head" if name.startswith("heads.") else name.rsplit(".", 1)[0]


def analyse(arch: str, seed: int, cfg: TrainConfig) -> dict:
    bench = get_benchmark("split-digits", seed)
    strategy = SnapshotSPG(cfg)
    matrix, _ = run_sequence(strategy, bench, "task", arch, seed, cfg)
    net = strategy.model.base_model
    final = copy.deepcopy(net.state_dict())
    layers = sorted({layer_of(n) for n in final if layer_of(n) != "head"})
    t_last = bench.num_tasks - 1
    recovered: dict[str, list[float]] = {}
    drift: dict[str, list[float]] = {}
    for layer in layers + ["all backbone"]:
        recovered[layer], drift[layer] = [], []
        for j in range(t_last):
            keys = [k for k in final if layer == "all backbone" and not k.startswith("heads.")]
            keys = keys or [k for k in final if layer_of(k) == layer]
            net.load_state_dict({**final, **{k: strategy.weights[j][k] for k in keys}})
            acc = evaluate(net, _eval_batches(bench, j, "test"))[1]
            recovered[layer].append(acc - matrix[-1][j])
            num = sum(float((final[k] - strategy.weights[j][k]).norm() ** 2) for k in keys)
            den = sum(float(strategy.weights[j][k].norm() ** 2) for k in keys)
            drift[layer].append((num / den) ** 0.5)
    net.load_state_dict(final)
    per_layer = {}
    for layer in layers:
        names = [n for n in strategy.importance[0] if layer_of(n) == layer]
        rows = []
        for a in strategy.importance:
            flat = torch.cat([a[n].flatten() for n in names])
            rows.append(
                {"mean_A": float(flat.mean()), "saturated": float((flat >= 0.9).float().mean())}
            )
        per_layer[layer] = {"numel": sum(final[n].numel() for n in names), "after_task": rows}
    forgetting = [
        max(matrix[i][j] for i in range(j, t_last)) - matrix[-1][j] for j in range(t_last)
    ]
    return {
        "seed": seed,
        "matrix": matrix,
        "forgetting_per_task": forgetting,
        "recovered_by_restoring": recovered,
        "relative_drift": drift,
        "importance": per_layer,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("mlp", "cnn"), default="cnn")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--conv-importance", choices=("tensor", "channel"), default="tensor")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = TrainConfig()
    patch = (
        mock.patch("softmask_peft.importance.spg.normalize_importance", per_channel_conv)
        if args.conv_importance == "channel"
        else nullcontext()
    )
    with patch:
        runs = [analyse(args.arch, s, cfg) for s in range(args.seeds)]
    layers = list(runs[0]["recovered_by_restoring"])
    print(
        f"## SPG on Split-Digits ({args.arch}, conv importance per {args.conv_importance}), "
        f"seeds 0..{args.seeds - 1}\n"
    )
    acc = [np.mean(r["matrix"][-1]) for r in runs]
    fgt = [np.mean(r["forgetting_per_task"]) for r in runs]
    print(
        f"ACC {np.mean(acc):.2f} ± {np.std(acc, ddof=1):.2f}, "
        f"forgetting {np.mean(fgt):.2f} ± {np.std(fgt, ddof=1):.2f}"
    )
    print(
        "forgetting per task (points, mean over seeds):",
        np.round(np.mean([r["forgetting_per_task"] for r in runs], axis=0), 2).tolist(),
    )
    print(
        "\n| layer | elements | mean A after T0 / T4 | A>=0.9 after T4 | drift of T0's weights "
        "| accuracy recovered by restoring (points, mean over tasks 0-3 and seeds) |"
    )
    print("|---|---|---|---|---|---|")
    for layer in layers:
        rec = np.mean([r["recovered_by_restoring"][layer] for r in runs])
        drift = np.mean([r["relative_drift"][layer][0] for r in runs])
        if layer in runs[0]["importance"]:
            imp = [r["importance"][layer] for r in runs]
            a0 = np.mean([i["after_task"][0]["mean_A"] for i in imp])
            a4 = np.mean([i["after_task"][-1]["mean_A"] for i in imp])
            sat = np.mean([i["after_task"][-1]["saturated"] for i in imp])
            cells = f"{imp[0]['numel']} | {a0:.3f} / {a4:.3f} | {sat:.3f}"
        else:
            cells = "— | — | —"
        print(f"| {layer} | {cells} | {drift:.4f} | {rec:+.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "arch": args.arch,
                    "conv_importance": args.conv_importance,
                    "settings": cfg.to_dict(),
                    "runs": runs,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
