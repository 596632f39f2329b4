"""Trainer step time with and without soft-masking; importance pass on 1 vs 2 processes.

    python bench/trainer_overhead.py                  # tiny BERT (smoke)
    python bench/trainer_overhead.py --model minilm   # the bundled all-MiniLM-L6-v2

(1) `transformers.Trainer` vs `SoftMaskTrainer` (task 1, keep-masks active, update masking
    under AdamW): seconds per optimizer step from `train_runtime`, same data and arguments.
(2) The SPG importance pass over the same batches in 1 process and in 2 (`torchrun`, gloo on
    CPU): each rank takes every other batch, and the gradient sums are all-reduced. Wall time
    between two barriers, measured on rank 0.
Prints a table and writes JSON. Time it alone on the machine: other load distorts it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _common import print_table, write_json
from softmask_bench.minilm import minilm_path
from transformers import BertForSequenceClassification, Trainer, TrainingArguments

from softmask_peft import SoftMaskConfig, get_softmask_model
from softmask_peft.integrations.trainer import SoftMaskTrainer
from softmask_peft.testing import tiny_bert_config


def build_model(kind: str) -> BertForSequenceClassification:
    torch.manual_seed(0)
    if kind == "minilm":
        return BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=3)
    cfg = tiny_bert_config(dropout=0.1, vocab_size=64, hidden_size=32, intermediate_size=48,
                           max_position_embeddings=64)  # fmt: skip
    return BertForSequenceClassification(cfg)


def examples(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq_len), generator=g)
    return [{"input_ids": ids[i], "labels": int(ids[i, 0]) % 3} for i in range(n)]


def targs(out: str, steps: int, batch: int) -> TrainingArguments:
    return TrainingArguments(out, max_steps=steps, per_device_train_batch_size=batch,
                             report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_strategy="no")  # fmt: skip


def step_times(args) -> list[dict]:
    vocab = build_model(args.model).config.vocab_size
    data = examples(args.steps * args.batch, args.seq_len, vocab)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = Trainer(
            build_model(args.model), targs(tmp, args.steps, args.batch), train_dataset=data
        )
        t_plain = plain.train().metrics["train_runtime"] / args.steps
        model = get_softmask_model(build_model(args.model), SoftMaskConfig())
        trainer = SoftMaskTrainer(model, targs(tmp, args.steps, args.batch), mask_mode="update")
        trainer.train_dataset = data[: args.batch * 2]
        trainer.begin_task(0)
        trainer.end_task()  # task 0's importance: task 1 trains under keep-masks
        trainer.train_dataset = data
        trainer.begin_task(1)
        t_masked = trainer.train().metrics["train_runtime"] / args.steps
    rows.append({"what": "Trainer step (s)", "plain": t_plain, "softmask": t_masked,
                 "ratio": t_masked / t_plain})  # fmt: skip
    return rows


def importance_worker(args) -> None:
    """Run under torchrun: time the SPG pass on this rank's share of the batches."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, args.threads // world))
    model = get_softmask_model(build_model(args.model), SoftMaskConfig())
    vocab = model.config.vocab_size
    batches = [
        {k: torch.stack([torch.as_tensor(e[k]) for e in chunk]) for k in ("input_ids", "labels")}
        for chunk in (examples(args.batch * args.batches, args.seq_len, vocab)[i : i + args.batch]
                      for i in range(0, args.batch * args.batches, args.batch))
    ]  # fmt: skip
    model.begin_task(0)
    model.end_task(batches[rank::world])  # warm-up (lazy init, allocator); task 1 is timed
    model.begin_task(1)
    dist.barrier()
    start = time.perf_counter()
    model.end_task(batches[rank::world])
    dist.barrier()
    if rank == 0:
        print(json.dumps({"world": world, "seconds": time.perf_counter() - start}), flush=True)
    dist.destroy_process_group()


def importance_times(args) -> list[dict]:
    seconds = {}
    for world in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}", __file__, "--importance-worker",
               "--model", args.model, "--batch", str(args.batch), "--batches", str(args.batches),
               "--seq-len", str(args.seq_len), "--threads", str(args.threads)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=os.environ)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        line = [x for x in done.stdout.splitlines() if x.startswith("{")][-1]
        seconds[world] = json.loads(line)["seconds"]
    return [{"what": f"SPG importance pass, {args.batches} batches (s)", "plain": seconds[1],
             "softmask": seconds[2], "ratio": seconds[2] / seconds[1]}]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--importance-worker", action="store_true")
    p.add_argument("--json", default="docs/results/bench/bench_trainer_overhead.json")
    args = p.parse_args()
    if args.importance_worker:
        importance_worker(args)
        return
    torch.set_num_threads(args.threads)
    rows = step_times(args) + importance_times(args)
    print("(importance row: 'plain' = 1 process, 'softmask' = 2 processes)")
    print_table(rows, ["what", "plain", "softmask", "ratio"])
    write_json(Path(args.json), f"trainer_overhead_{args.model}", rows)


if __name__ == "__main__":
    main()
