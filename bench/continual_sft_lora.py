"""Continual instruction tuning with TRL's SFTTrainer + LoRA: does soft-masking cut forgetting?

    python bench/continual_sft_lora.py                       # 3 seeds, all methods (~12 min, 2 cores)
    python bench/continual_sft_lora.py --seeds 0 --methods plain softmask   # a quick look

A tiny Llama-style causal LM (character tokenizer, `softmask_bench.char_lm`) is first pre-trained
in-repo on the offline "general" text domain (`softmask_bench.text_domains`, a plain torch loop,
shared by all methods and seeds), then learns 4 instruction tasks in sequence, each through
`trl.SFTTrainer` with completion-only loss on prompt/completion pairs over random lowercase words:

    T0 "copy: abcd =>" -> "abcd"      T1 "upper: abcd =>" -> "ABCD"
    T2 "alpha: abcd =>" -> "alpha a"  T3 "omega: abcd =>" -> "omega d"

The instruction names the task, so one model can hold all four; forgetting is interference.
Accuracy = teacher-forced token accuracy on the completion (eval words unseen in training).
R[i][j] = accuracy on task j after training task i; ACC, BWT, forgetting (Chaudhry et al.
2018) and plasticity = mean_j R[j][j] from `softmask_bench.metrics`.

Methods, one budget (epochs, lr, batch, LoRA rank and targets, AdamW):
  plain      one LoRA adapter trained task after task (the baseline)
  softmask   the same + SoftMaskCallback (SPG importance of the LoRA factors, update masking)
  softmask-sgd  the same with SGD (lr x 10) and grad masking, the paper's optimizer
  per-task   a fresh adapter per task, evaluated with its task's adapter (task id given: an
             upper bound on retention, no forgetting by construction)
  o-lora     O-LoRA-style (Wang et al. 2023): after each task the adapter is merged and a new one
             trained with λ Σ |A_new A_oldᵀ| pushing its subspace orthogonal to the old ones
  replay     plain + 8 stored examples of each earlier task mixed in (stores data: a reference)
Prints a table (mean ± std over seeds) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
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

TASKS = {  # instruction -> a fixed answer word per task, spelled out over the input word
    "copy": lambda w: w,
    "upper": lambda w: w.upper(),
    "alpha": lambda w: "alpha " + w[0],
    "omega": lambda w: "omega " + w[-1],
}
METHODS = ["plain", "softmask", "o-lora", "replay", "per-task", "softmask-sgd"]
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
    if method.startswith("softmask"):
        callbacks = [SoftMaskCallback(get_softmask_model(model, SoftMaskConfig()))]
    old_a: dict[str, list[torch.Tensor]] = {}
    adapters: list[dict[str, torch.Tensor]] = []
    r = np.zeros((len(tasks), len(tasks)))
    with tempfile.TemporaryDirectory() as out:
        for t, (train, _) in enumerate(tasks):
            data = list(train)
            if method == "replay":
                rng = random.Random(seed + t)
                for prev, _ in tasks[:t]:
                    data += rng.sample(prev, args.replay)
            if method == "per-task" and t > 0:
                torch.manual_seed(seed + t)
                model = get_peft_model(fresh_base(), lora)
            sgd = method == "softmask-sgd"
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
            if method == "o-lora":
                OrthogonalLoRATrainer(**kw, old_a=old_a, lam=args.olora_lambda).train()
            else:
                SFTTrainer(**kw).train()
            if method == "per-task":
                adapters.append(
                    {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
                )
            for j, (_, evals) in enumerate(tasks):
                if method == "per-task" and j <= t:
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
            if method == "o-lora" and t < len(tasks) - 1:
                for n, p in model.named_parameters():
                    if "lora_A" in n:
                        old_a.setdefault(_module_key(n), []).append(p.detach().clone())
                merged = model.merge_and_unload()
                torch.manual_seed(seed + t)
                model = get_peft_model(merged, lora)
    return r.tolist()


def fmt(ms) -> str:
    return "n/a" if ms is None else f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
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
    ap.add_argument("--out", default="docs/results/bench/bench_continual_sft_lora.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    torch.set_num_threads(2)
    tok = char_tokenizer()
    start = time.time()
    base_state = pretrain(tok, args)
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
    rows = []
    header = "| method | ACC | BWT | forgetting | plasticity |"
    print("\n" + header + "\n|---|---|---|---|---|")
    for method, runs in results["runs"].items():
        stats = {k: mean_std([x[k] for x in runs]) for k in ("acc", "bwt", "forgetting", "plasticity")}
        results.setdefault("summary", {})[method] = stats
        row = f"| {method} | " + " | ".join(fmt(stats[k]) for k in ("acc", "bwt", "forgetting", "plasticity")) + " |"
        rows.append(row)
        print(row)
    if "plain" in results["runs"] and "softmask" in results["runs"]:
        s = results["summary"]
        for m in [m for m in results["runs"] if m.startswith("softmask")]:
            cut = 1 - s[m]["forgetting"][0] / s["plain"]["forgetting"][0]
            gap = 100 * (s[m]["plasticity"][0] - s["plain"]["plasticity"][0])
            results["summary"][m]["forgetting_cut_vs_plain"] = cut
            print(f"{m}: forgetting cut vs plain {100 * cut:.0f} %, plasticity {gap:+.1f} points vs plain")
    results["seconds"] = time.time() - start
    print(f"total {results['seconds']:.0f}s (2 shared CPU cores)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
