"""Continual instruction tuning with TRL's SFTTrainer + LoRA: does soft-masking cut forgetting?

    python bench/continual_sft_lora.py                       # 3 seeds, the table's 10 methods
    python bench/continual_sft_lora.py --seeds 0 --methods plain subspace-sgd   # a quick look

A tiny Llama-style causal LM (character tokenizer, `softmask_bench.char_lm`, hidden 64, 2
layers) is first pre-trained in-repo on the offline "general" text domain
(`softmask_bench.text_domains`, 400 steps of a plain torch loop, shared by all methods and
seeds), then learns 4 instruction tasks in sequence, each through `trl.SFTTrainer` with
completion-only loss on prompt/completion pairs over random lowercase words (3-6 letters):

    T0 "first: abcd =>" -> "red a"      T1 "last: abcd =>" -> "blue d"
    T2 "second: abcd =>" -> "green b"   T3 "size: abcd =>" -> "gold 4"

Why these tasks: every task maps the *same* inputs to its own answer word plus one character
read off the word, and the instruction names the task. So (a) each is learnable by a LoRA in
the budget (a keyword and a one-position copy: 0.6-0.9 token accuracy, chance is ~0.2), (b)
they interfere (trained on one task at a time, the cheapest solution is "always answer blue",
which overwrites the earlier keyword: plain sequential LoRA falls back to chance on old tasks),
and (c) one model can hold all four (`joint`: forgetting ~0). The earlier version (copy / upper
/ alpha / omega) was weak: the tiny model never learned copy and upper.
Accuracy = teacher-forced token accuracy on the completion (eval words unseen in training).
R[i][j] = accuracy on task j after training task i; ACC = mean_j R[T-1][j], BWT = mean_{j<T-1}
(R[T-1][j] - R[j][j]), forgetting = mean_{j<T-1} max_{j<=l<T-1} (R[l][j] - R[T-1][j])
(Chaudhry et al. 2018) and plasticity = mean_j R[j][j], from `softmask_bench.metrics`.
Task-incremental in the prompt only: no task id reaches the model except per-task.

Methods, one budget (10 epochs of 48 examples, batch 8, LoRA r 8 on q/k/v/o/up/down; AdamW lr
3e-2, or SGD lr 0.3 for the "-sgd" variants; plain, softmask and o-lora run with both, so the
protecting methods get no optimizer the baselines did not):
  plain        one LoRA adapter trained task after task (the baseline)
  softmask     the same + SoftMaskCallback with lora_mask="factors" (SPG importance of the LoRA
               factors; AdamW: update masking, SGD: grad masking, the paper's optimizer)
  subspace     SoftMaskCallback with the default config (lora_mask="subspace", SGD only):
               after each task the adapter is folded into the base weights and a fresh one
               trained with its A update soft-masked away from the input directions earlier
               tasks used (K = I - U diag(tanh(λ/(s Σλ))) Uᵀ, s = --subspace-scale)
  o-lora       O-LoRA-style (Wang et al. 2023): after each task the adapter is merged and a new one
               trained with λ Σ |A_new A_oldᵀ| pushing its subspace orthogonal to the old ones
  replay       plain + 8 stored examples of each earlier task mixed in (stores data: a reference)
  joint        plain + every earlier task's whole training set (multitask reference: one model
               can hold all four)
  per-task     a fresh adapter per task, evaluated with its task's adapter (task id given: an
               upper bound on retention, no forgetting by construction)
Probes (not in the default run, numbers in docs/guides/trainer-trl.md): fold (fold + fresh
adapter, no mask), softmask-units (fold + importance of ΔW = B·A per output row / input column
mapped onto B's rows and A's columns). The library refuses `subspace` with AdamW.
Prints a table (mean ± std over seeds) and writes JSON. BASE_CACHE=file.safetensors (env)
stores/reuses the pre-trained base (the same weights: the pre-training is deterministic).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from softmask_bench.char_lm import char_tokenizer, tiny_causal_lm
from softmask_bench.metrics import compute_metrics, mean_std
from softmask_bench.text_domains import load_text_domains
from transformers.utils import logging as hf_logging
from trl import SFTConfig, SFTTrainer

from softmask_peft import SoftMaskConfig, get_softmask_model
from softmask_peft.integrations.callback import SoftMaskCallback
from softmask_peft.lora_subspace import LoRASubspace

TASKS = {  # instruction -> the task's own answer word + one character read off the input word
    "first": lambda w: "red " + w[0],
    "last": lambda w: "blue " + w[-1],
    "second": lambda w: "green " + w[1],
    "size": lambda w: "gold " + str(len(w)),
}
METHODS = [  # the table's rows; "-sgd" = the same method with SGD (lr x 10) instead of AdamW
    "plain", "plain-sgd", "softmask", "softmask-sgd", "subspace-sgd", "o-lora", "o-lora-sgd",
    "replay", "joint", "per-task",
]
EXTRA = ["fold", "softmask-units"]  # probes (seed 0 in the guide), not in the default run
FOLDING = ("fold", "softmask-units")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def words(rng: random.Random, n: int, exclude: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        if w not in exclude and w not in out:
            out.append(w)
    return out


def make_tasks(seed: int, n_train: int, n_eval: int) -> list[tuple[list[dict], list[dict]]]:
    rng = random.Random(seed)
    train_words = words(rng, n_train, set())
    eval_words = words(rng, n_eval, set(train_words))
    out = []
    for name, fn in TASKS.items():
        pairs = [
            [{"prompt": f"{name}: {w} =>", "completion": " " + fn(w)} for w in ws]
            for ws in (rng.sample(train_words, len(train_words)), eval_words)
        ]
        out.append((pairs[0], pairs[1]))
    return out


def pretrain(tok, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The base LM: next-character prediction on the offline general text (plain torch loop)."""
    model = tiny_causal_lm(len(tok), hidden=args.hidden, layers=args.layers, seed=1234)
    text = " ".join(load_text_domains(max_passages=200, seed=0).general.train)
    ids = torch.tensor(tok(text).input_ids)
    n = (len(ids) // 65) * 65
    chunks = ids[:n].view(-1, 65)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(args.pretrain_steps):
        batch = chunks[torch.randint(0, len(chunks), (16,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    print(f"pre-trained {args.pretrain_steps} steps, final LM loss {float(loss):.3f}", flush=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def accuracy(model, tok, examples: list[dict]) -> float:
    """Teacher-forced token accuracy over the completion characters."""
    model.eval()
    correct = total = 0
    for ex in examples:
        p = tok(ex["prompt"]).input_ids
        c = tok(ex["completion"]).input_ids
        ids = torch.tensor([p + c])
        pred = model(input_ids=ids).logits[0, len(p) - 1 : -1].argmax(-1)
        correct += int((pred == torch.tensor(c)).sum())
        total += len(c)
    return correct / total


class OrthogonalLoRATrainer(SFTTrainer):
    """O-LoRA-style: SFT loss + λ Σ_modules |A_new A_oldᵀ|_1 over the stored old A matrices."""

    def __init__(self, *a: Any, old_a: dict[str, list[torch.Tensor]], lam: float, **kw: Any):
        super().__init__(*a, **kw)
        self.old_a, self.lam = old_a, lam

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, False, num_items_in_batch)
        penalty = 0.0
        for name, p in model.named_parameters():
            key = _module_key(name)
            if "lora_A" in name and key in self.old_a:
                for old in self.old_a[key]:
                    penalty = penalty + (p @ old.T).abs().sum()
        return loss + self.lam * penalty


def _module_key(name: str) -> str:
    """'...layers.0.self_attn.q_proj.lora_A.default.weight' -> 'layers.0.self_attn.q_proj'."""
    return name.split("lora_")[0].split("model.", 2)[-1].rstrip(".")


def run(method: str, seed: int, base_state, tok, args) -> list[list[float]]:
    tasks = make_tasks(seed, args.train, args.eval)
    sgd = method.endswith("-sgd")  # any method with SGD (lr x 10) instead of AdamW
    base = method.removesuffix("-sgd")
    lora = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, task_type="CAUSAL_LM"
    )

    def fresh_base():
        m = tiny_causal_lm(len(tok), hidden=args.hidden, layers=args.layers)
        m.load_state_dict(base_state)
        return m

    torch.manual_seed(seed)
    model = get_peft_model(fresh_base(), lora)
    callbacks = []
    if base.startswith("softmask"):
        options = {"lora_mask": "factors", **json.loads(args.softmask_config)}
        sm = get_softmask_model(model, SoftMaskConfig(**options))
        if base == "softmask-units":  # a probe: the importance pass replaced (no capacity rule)
            sm.method.run = lambda task, batches, general=None, shape=None: lora_unit_importance(
                sm, batches, args.unit_norm
            )
        callbacks = [SoftMaskCallback(sm)]
    if base == "subspace":  # the default for a LoRA PeftModel: folds at the end of every train()
        sm = get_softmask_model(model, SoftMaskConfig(lora_subspace_scale=args.subspace_scale))
        callbacks = [SoftMaskCallback(sm)]
    old_a: dict[str, list[torch.Tensor]] = {}
    adapters: list[dict[str, torch.Tensor]] = []
    r = np.zeros((len(tasks), len(tasks)))
    with tempfile.TemporaryDirectory() as out:
        for t, (train, _) in enumerate(tasks):
            data = list(train)
            if base == "replay":
                rng = random.Random(seed + t)
                for prev, _ in tasks[:t]:
                    data += rng.sample(prev, args.replay)
            if base == "joint":  # every earlier task's whole training set again
                for prev, _ in tasks[:t]:
                    data += prev
            if base == "per-task" and t > 0:
                torch.manual_seed(seed + t)
                model = get_peft_model(fresh_base(), lora)
            cfg = SFTConfig(
                output_dir=f"{out}/{t}",
                per_device_train_batch_size=args.batch,
                num_train_epochs=args.epochs,
                learning_rate=args.lr * (10 if sgd else 1),
                optim="sgd" if sgd else "adamw_torch",
                lr_scheduler_type="constant",
                report_to=[],
                save_strategy="no",
                logging_strategy="no",
                use_cpu=True,
                disable_tqdm=True,
                seed=seed,
                data_seed=seed,
                max_length=64,
                gradient_checkpointing=False,
            )
            kw = dict(
                model=model,
                args=cfg,
                train_dataset=Dataset.from_list(data),
                processing_class=tok,
                callbacks=callbacks,
            )
            if base == "o-lora":
                trainer = OrthogonalLoRATrainer(**kw, old_a=old_a, lam=args.olora_lambda)
            else:
                trainer = SFTTrainer(**kw)
            trainer.train()
            if base == "per-task":
                adapters.append(
                    {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
                )
            for j, (_, evals) in enumerate(tasks):
                if base == "per-task" and j <= t:
                    own = dict(model.named_parameters())
                    saved = {n: own[n].detach().clone() for n in adapters[j]}
                    with torch.no_grad():
                        for n, v in adapters[j].items():
                            own[n].copy_(v)
                    r[t, j] = accuracy(model, tok, evals)
                    with torch.no_grad():
                        for n, v in saved.items():
                            own[n].copy_(v)
                else:
                    r[t, j] = accuracy(model, tok, evals)
            if base in FOLDING and t < len(tasks) - 1:
                torch.manual_seed(seed + t)
                LoRASubspace(model, 1.0).fold()  # no task's covariance yet: a plain fold
            if base == "o-lora" and t < len(tasks) - 1:
                for n, p in model.named_parameters():
                    if "lora_A" in n:
                        old_a.setdefault(_module_key(n), []).append(p.detach().clone())
                merged = model.merge_and_unload()
                torch.manual_seed(seed + t)
                model = get_peft_model(merged, lora)
    return r.tolist()


def lora_unit_importance(sm, batches, norm: str) -> dict[str, torch.Tensor]:
    """Importance of ΔW = B·A per output unit (rows of B) and input feature (columns of A):
    G = Σ ∂L/∂W; per row / column norm v: "std" |tanh(standardize(v))| (SPG's rule, which also
    marks units far *below* the mean), "mean" tanh(v / mean v)."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    net = sm.base_model
    mods = {n: m for n, m in net.named_modules() if isinstance(m, LoraLinear)}
    G = {n: torch.zeros(m.out_features, m.in_features) for n, m in mods.items()}
    hooks = []
    def make(n, m):
        def fwd(mod, args, out):
            x = args[0].detach()
            def bwd(d):
                G[n].add_(m.scaling["default"] * torch.einsum("...o,...i->oi", d.detach().float(), x.float()))
            out.register_hook(bwd)
        return fwd
    for n, m in mods.items():
        hooks.append(m.register_forward_hook(make(n, m)))
    try:
        for batch in batches:
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
            net.zero_grad()
            net(**batch).loss.backward()
    finally:
        for h in hooks:
            h.remove()
        net.zero_grad()
    def imp(v):
        if norm == "mean":
            return torch.tanh(v / v.mean().clamp_min(1e-12))
        z = (v - v.mean()) / (v.std() + 1e-12)
        return torch.tanh(z).abs()
    out = {}
    params = dict(net.named_parameters())
    for n in mods:
        g = G[n]
        rows, cols = imp(g.norm(dim=1)), imp(g.norm(dim=0))
        a, b = f"{n}.lora_A.default.weight", f"{n}.lora_B.default.weight"
        out[b] = rows[:, None].expand_as(params[b]).contiguous()
        out[a] = cols[None, :].expand_as(params[a]).contiguous()
    return {k: out[k] for k in sm.masked_parameter_names}


def fmt(ms) -> str:
    return "n/a" if ms is None else f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def summarize(results: dict[str, Any]) -> None:
    """Mean ± std per method into results["summary"]; each protecting method's forgetting cut
    (1 - F_m / F_plain) and plasticity gap against plain (AdamW) and plain-sgd; print the table."""
    keys = ("acc", "bwt", "forgetting", "plasticity")
    print("\n| method | ACC | BWT | forgetting | plasticity |\n|---|---|---|---|---|")
    summary = results["summary"] = {}
    for method, runs in results["runs"].items():
        summary[method] = {k: mean_std([x[k] for x in runs]) for k in keys}
        print(f"| {method} | " + " | ".join(fmt(summary[method][k]) for k in keys) + " |")
    for m in summary:
        if m.removesuffix("-sgd") in ("plain", "replay", "joint", "per-task"):
            continue
        for ref in ("plain", "plain-sgd"):
            if ref in summary and summary[ref]["forgetting"][0] > 0:
                cut = 1 - summary[m]["forgetting"][0] / summary[ref]["forgetting"][0]
                gap = 100 * (summary[m]["plasticity"][0] - summary[ref]["plasticity"][0])
                summary[m][f"vs_{ref}"] = {"forgetting_cut": cut, "plasticity_points": gap}
                print(f"{m} vs {ref}: forgetting {100 * cut:.0f} % lower, plasticity {gap:+.1f} points")


def merge(paths: list[str], out: str) -> None:
    """One table from several runs of this script (e.g. methods run in separate processes):
    refuses runs whose shared arguments differ (other than methods and out)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    shared = set.intersection(*(set(p["args"]) for p in parts)) - {"methods", "out"}
    same = {k: parts[0]["args"][k] for k in shared}
    results: dict[str, Any] = {"args": {**parts[0]["args"], "methods": []}, "tasks": parts[0]["tasks"],
                               "runs": {}, "merged_from": paths, "seconds": 0.0}
    for p, part in zip(paths, parts):
        args = {k: part["args"][k] for k in shared}
        if args != same:
            raise SystemExit(f"{p} was run with other arguments: {args} != {same}")
        results["runs"].update(part["runs"])
        results["args"]["methods"] += part["args"]["methods"]
        results["seconds"] += part.get("seconds", 0.0)
    results["args"]["out"] = out
    summarize(results)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    names = {m.removesuffix("-sgd") for m in METHODS + EXTRA}
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=sorted(names | {m + "-sgd" for m in names}))
    ap.add_argument("--train", type=int, default=48, help="training examples per task")
    ap.add_argument("--eval", type=int, default=12, help="eval examples per task")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--replay", type=int, default=8, help="stored examples per earlier task")
    ap.add_argument("--olora-lambda", type=float, default=0.5)
    ap.add_argument("--softmask-config", default="{}", help="SoftMaskConfig kwargs (JSON)")
    ap.add_argument("--unit-norm", choices=["std", "mean"], default="mean", help="softmask-units")
    ap.add_argument("--subspace-scale", type=float, default=0.02, help="SoftMaskConfig.lora_subspace_scale")
    ap.add_argument("--out", default="docs/results/bench/bench_continual_sft_lora.json")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="only merge these runs into --out")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    torch.set_num_threads(2)
    tok = char_tokenizer()
    start = time.time()
    cache = os.environ.get("BASE_CACHE")
    if cache and Path(cache).exists():
        from safetensors.torch import load_file

        base_state = load_file(cache)
    else:
        base_state = pretrain(tok, args)
        if cache:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in base_state.items()}, cache)
    results: dict[str, Any] = {"args": vars(args), "tasks": list(TASKS), "runs": {}}
    for method in args.methods:
        runs = []
        for seed in args.seeds:
            t0 = time.time()
            r = run(method, seed, base_state, tok, args)
            runs.append({"seed": seed, "R": r, **compute_metrics(r), "seconds": time.time() - t0})
            print(f"R = {np.round(np.asarray(r), 2).tolist()}", flush=True)
            print(f"{method:13s} seed {seed}: " + "  ".join(
                f"{k} {runs[-1][k]:.3f}" for k in ("acc", "forgetting", "plasticity")
            ) + f"  ({runs[-1]['seconds']:.0f}s)", flush=True)
            results["runs"][method] = runs
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")  # partial results
    summarize(results)
    results["seconds"] = time.time() - start
    print(f"total {results['seconds']:.0f}s (2 shared CPU cores)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
