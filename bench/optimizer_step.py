"""Cost of SoftMaskOptimizer.step() vs the plain optimizer's step on a MiniLM-sized parameter set.

BertConfig(6 layers, hidden 384, 12 heads, FFN 1536, vocab 30522), random init and random
gradients and importance; median over repeats. Target: grad mode <= 1.10x the plain step. Both
timings include restoring the gradients before each step (so grad mode never compounds its
scaling); `ratio_without_restore` subtracts the restore's own median time from both. The last column puts the extra time against one forward + backward of the model on a
batch of 8 x 128 tokens, which is what a training step costs besides the optimizer.
Run: python bench/optimizer_step.py --out results/bench_optimizer_step.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _common import median_time, print_table, write_json
from transformers import BertModel

from softmask_peft import SoftMaskConfig, SoftMaskOptimizer, get_softmask_model
from softmask_peft.testing import seed_importance, tiny_bert_config

OPTIMIZERS = {
    "SGD": lambda params: torch.optim.SGD(params, lr=0.01, foreach=True),
    "AdamW": lambda params: torch.optim.AdamW(params, lr=1e-3, foreach=True),
}


def build() -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    cfg = tiny_bert_config(  # MiniLM's sizes on the one tiny builder
        dropout=0.1, num_hidden_layers=6, hidden_size=384, num_attention_heads=12,
        intermediate_size=1536, vocab_size=30522, max_position_embeddings=512,
    )  # fmt: skip
    net = BertModel(cfg)
    model = get_softmask_model(net, SoftMaskConfig(method="spg"))
    model.begin_task(0)
    seed_importance(model, {n: torch.rand_like(p) for n, p in net.named_parameters()})
    model.begin_task(1)
    for p in net.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return net, model


def train_step(net: torch.nn.Module, batch: int = 8, seq: int = 128) -> None:
    """Forward + backward of the model on one batch: what a masked step is amortised against."""
    ids = torch.randint(
        0, net.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)
    )
    net.zero_grad(set_to_none=False)
    net(input_ids=ids).last_hidden_state.pow(2).mean().backward()


def restoring(step: Callable[[], object], net: torch.nn.Module) -> Callable[[], None]:
    """`step` preceded by resetting every .grad to the same values (grad mode scales in place)."""
    grads = [p.grad.clone() for p in net.parameters()]

    def run() -> None:
        with torch.no_grad():
            torch._foreach_copy_([p.grad for p in net.parameters()], grads)
        step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="results/bench_optimizer_step.json")
    args = parser.parse_args()
    net, model = build()
    t_restore = median_time(restoring(lambda: None, net), args.repeats)
    rows = []
    for opt_name, make in OPTIMIZERS.items():
        for mode in ("grad", "update"):
            plain = make(net.parameters())
            wrapped = SoftMaskOptimizer(make(net.parameters()), model, mask_mode=mode)
            t_plain = median_time(restoring(plain.step, net), args.repeats)
            t_mask = median_time(restoring(wrapped.step, net), args.repeats)
            rows.append(
                {
                    "optimizer": opt_name,
                    "mask_mode": mode,
                    "params": sum(p.numel() for p in net.parameters()),
                    "plain_ms": 1e3 * t_plain,
                    "softmask_ms": 1e3 * t_mask,
                    "ratio": t_mask / t_plain,
                    "ratio_without_restore": (t_mask - t_restore) / (t_plain - t_restore),
                }
            )
    t_train = median_time(lambda: train_step(net), max(3, args.repeats // 6), warmup=1)
    for row in rows:
        row["train_step_ms"] = 1e3 * t_train
        row["overhead_of_train_step"] = (row["softmask_ms"] - row["plain_ms"]) / (1e3 * t_train)
    print_table(
        rows,
        [
            "optimizer",
            "mask_mode",
            "plain_ms",
            "softmask_ms",
            "ratio",
            "ratio_without_restore",
            "overhead_of_train_step",
        ],
    )
    write_json(args.out, "optimizer_step", rows)


if __name__ == "__main__":
    main()
