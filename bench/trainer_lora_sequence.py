"""Three text-classification tasks in sequence on the bundled all-MiniLM-L6-v2: Trainer + LoRA.

    python bench/trainer_lora_sequence.py                    # ~ a few minutes on 2 CPU cores
    python bench/trainer_lora_sequence.py --train-per-class 8 --eval-per-class 8 --epochs 1  # smoke

Tasks (binary, one shared LoRA adapter and one shared classifier head, task id not given at
test time) from the offline text domains of `softmask_bench.text_domains`:
  T0 stdlib docstrings (0) vs scikit-learn dataset descriptions (1)
  T1 licence texts (0) vs package READMEs (1)
  T2 stdlib docstrings (0) vs package READMEs (1)
One labelling solves all three (docs, licences -> 0; descriptions, READMEs -> 1), so forgetting
is interference, not contradiction. Methods with the same budget (epochs, lr, batch, LoRA r):
plain LoRA fine-tuning (`transformers.Trainer`) and SPG on the LoRA factors (`SoftMaskTrainer`,
`lora_mask="factors"`, update masking under AdamW; the default LoRA subspace mask needs SGD and
is measured by bench/continual_sft_lora.py). Prints the accuracy matrix R[i][j] (after task i, on task j), ACC, BWT and
forgetting, and the adapter and importance file sizes; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from softmask_bench.metrics import compute_metrics
from softmask_bench.minilm import minilm_path
from softmask_bench.text_domains import load_text_domains
from transformers import (
    AutoTokenizer,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from softmask_peft import SoftMaskConfig, get_softmask_model
from softmask_peft.integrations.trainer import SoftMaskTrainer

TASKS = [("stdlib_docs", "general"), ("licenses", "package_readmes"), ("stdlib_docs", "package_readmes")]  # fmt: skip


def build_tasks(tokenizer, per_class: int, eval_per_class: int, seq_len: int, seed: int):
    """[(train examples, eval examples)] per task, tokenised, balanced, shuffled."""
    texts = load_text_domains(max_passages=400, seed=seed)
    sets = {**texts.domains, "general": texts.general}
    rng = random.Random(seed)
    out = []
    for pair in TASKS:
        split = []
        for part, n in (("train", per_class), ("eval", eval_per_class)):
            items = []
            for label, name in enumerate(pair):
                pool = list(getattr(sets[name], part))
                rng.shuffle(pool)
                items += [(x, label) for x in pool[:n]]
            rng.shuffle(items)
            enc = tokenizer([x for x, _ in items], truncation=True, max_length=seq_len,
                            padding="max_length", return_tensors="pt")  # fmt: skip
            split.append([
                {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                 "labels": y}
                for i, (_, y) in enumerate(items)
            ])  # fmt: skip
        out.append(tuple(split))
    return out


def peft_minilm(seed: int):
    torch.manual_seed(seed)
    base = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                      modules_to_save=["classifier"])  # fmt: skip
    return get_peft_model(base, lora)


def accuracy(trainer: Trainer, data) -> float:
    pred = trainer.predict(data)
    return float(np.mean(pred.predictions.argmax(-1) == pred.label_ids))


def run(method: str, tasks, args, workdir: Path) -> dict:
    pm = peft_minilm(args.seed)
    targs = TrainingArguments(
        str(workdir / method), num_train_epochs=args.epochs, learning_rate=args.lr,
        per_device_train_batch_size=args.batch, per_device_eval_batch_size=32, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=args.seed,
    )  # fmt: skip
    if method == "spg":
        model = get_softmask_model(pm, SoftMaskConfig(lora_mask="factors"))
        trainer = SoftMaskTrainer(model, targs, mask_mode="update")
    else:
        trainer = Trainer(pm, targs)
    r = []
    for t, (train, _) in enumerate(tasks):
        trainer.train_dataset = train
        if method == "spg":
            trainer.begin_task(t)
        else:
            trainer.optimizer, trainer.lr_scheduler = None, None  # a fresh optimizer, as SPG
        trainer.train()
        if method == "spg":
            trainer.end_task()
        r.append([accuracy(trainer, ev) for _, ev in tasks])
        print(f"{method}: after task {t}: " + " ".join(f"{a:.3f}" for a in r[-1]), flush=True)
    result = {"method": method, "R": r, **compute_metrics(r)}
    if method == "spg":
        out = workdir / "spg_final"
        trainer.save_model(str(out))
        result["files"] = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train-per-class", type=int, default=32)
    p.add_argument("--eval-per-class", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="docs/results/bench/bench_trainer_lora_sequence.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tasks = build_tasks(
        tokenizer, args.train_per_class, args.eval_per_class, args.seq_len, args.seed
    )
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(m, tasks, args, Path(tmp)) for m in ("lora", "spg")]
    print("\n| method | R (rows: after task i) | ACC | BWT | forgetting |\n|---|---|---|---|---|")
    for res in results:
        rows = "; ".join(" ".join(f"{a:.3f}" for a in row) for row in res["R"])
        print(f"| {res['method']} | {rows} | {res['acc']:.3f} | {res['bwt']:.3f} | "
              f"{res['forgetting']:.3f} |")  # fmt: skip
    print("\nSPG save (bytes):", json.dumps(results[1]["files"]))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "trainer_lora_sequence", "settings": vars(args), "results": results}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
