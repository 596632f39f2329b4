"""Time of one DAS importance pass on the real all-MiniLM-L6-v2, as a multiple of one training
epoch on the same N sequences.

"general" = `model.general_importance` (proxy KL: two forwards + one backward to the
virtual masks per batch); "domain" = `end_task` (the model's own MLM loss, one forward + one
backward per batch); "epoch" = one AdamW epoch of plain MLM training (`model(**batch).loss`,
backward, step) on the same batches. Sequences are the `licenses` domain's passages with BERT
MLM masking. Wall times, best of --repeats, after one warm-up batch.
Run: python bench/das_importance.py --sequences 64 128 --out results/bench_das_importance.json
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import print_table, write_json  # noqa: E402
from softmask_bench.minilm import load_minilm_mlm  # noqa: E402
from softmask_bench.mlm_batches import encode, fixed_mlm_batches  # noqa: E402
from softmask_bench.text_domains import load_text_domains  # noqa: E402

from softmask_peft import SoftMaskConfig, SoftMaskModel  # noqa: E402


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(n: int, batch_size: int, seq_len: int, repeats: int, texts: list[str]) -> dict:
    torch.manual_seed(0)
    net, tokenizer = load_minilm_mlm()
    batches = fixed_mlm_batches(encode(texts[:n], tokenizer, seq_len, batch_size), tokenizer, 0)
    model = SoftMaskModel(net, SoftMaskConfig(method="das"))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)

    def epoch() -> None:
        net.train()
        for b in batches:
            opt.zero_grad(set_to_none=True)
            net(**b).loss.backward()
            opt.step()

    def domain() -> None:
        state = model.method.start(0)
        net.train()
        for b in batches:
            state = model.method.add(state, b)
        model.method.result(state)

    model.general_importance(batches[:1])  # warm-up
    t_general = best_time(lambda: model.general_importance(batches), repeats)
    t_domain = best_time(domain, repeats)
    t_epoch = best_time(epoch, repeats)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return {
        "sequences": n,
        "tokens": tokens,
        "general_s": t_general,
        "domain_s": t_domain,
        "importance_s": t_general + t_domain,
        "epoch_s": t_epoch,
        "importance_x_epoch": (t_general + t_domain) / t_epoch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, nargs="+", default=[64])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="results/bench_das_importance.json")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    texts = load_text_domains(max_passages=max(args.sequences) * 2).domains["licenses"]
    pool = texts.train + texts.eval
    rows = [measure(n, args.batch_size, args.seq_len, args.repeats, pool) for n in args.sequences]
    print_table(
        rows,
        [
            "sequences",
            "tokens",
            "general_s",
            "domain_s",
            "importance_s",
            "epoch_s",
            "importance_x_epoch",
        ],
    )
    write_json(args.out, "das_importance", rows)


if __name__ == "__main__":
    main()
