"""Continual causal-LM study: naive fine-tuning vs DAS without and with its contrastive term.

Issue 13, item 2. A tiny decoder (Llama-style by default: no dropout, so DAS's general
importance runs on its unit dropout; `--arch gpt2` for GPT-2 with its own dropout 0.1) on
byte-level text (UTF-8 bytes, vocabulary 256, no tokenizer download), from the offline sets of
`softmask_bench.text_domains`:

1. pre-train from random init on `general` (default `package_readmes`, ~950 passages: English
   prose about software) for `pretrain_steps`; its eval split measures the knowledge the base
   has. (The module's own held-out general set, scikit-learn's dataset descriptions, has 35
   train passages: a byte-level model overfits it within ~200 steps, after which any domain
   training *lowers* its eval loss, so it cannot show forgetting. `--general sklearn` uses it.)
2. from that base, train the other domains (default `stdlib_docs` then `licenses`), `steps`
   AdamW steps each, the same batches for every method:
   * `naive` — causal-LM loss, every parameter free, at `lr`;
   * `naive@matched_lr` — the same at a slower `matched_lr`, to bracket DAS's domain loss;
   * `das w=0` — DAS soft-masking (general importance by proxy KL on the first domain, then
     each domain's importance; `mask_mode` "update" by default, AdamW-proof) without the
     contrastive integration term;
   * `das w=W` — the same plus the contrastive term at weight W (each of `contrastive_weights`;
     default: SoftMaskConfig's default);
3. after each domain: mean next-byte cross-entropy (nats/byte) on every domain's eval chunks and
   on the general eval chunks.

Matched comparison (as the MiniLM study): naive's final general loss, interpolated linearly
between its two learning rates to each DAS run's final mean domain loss, against DAS's.
Numbers are means ± sample std over seeds. Runs use one thread (tiny models; OpenMP threads
only spin here). Step times are printed but were measured on a shared machine.

Run: PYTHONPATH=. python bench/das_causal_lm.py            (defaults: < 5 min on 2 cores)
     PYTHONPATH=. python bench/das_causal_lm.py --seeds 0 --steps 10 --pretrain-steps 20
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from softmask_bench.das_report import at_domain_loss
from softmask_bench.text_domains import DOMAINS, load_text_domains
from torch import Tensor, nn

from softmask_peft import DASConfig, SoftMaskConfig, SoftMaskModel, SoftMaskOptimizer
from softmask_peft.testing import tiny_gpt2_config, tiny_llama_config

Batch = dict[str, Tensor]
VOCAB = 256


def _opt(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass
class Settings:
    arch: str = _opt("llama", "llama (dropout 0) or gpt2 (dropout 0.1)")
    seeds: str = _opt("0,1,2", "comma-separated seeds")
    general: str = _opt("package_readmes", f"pre-training set: one of {DOMAINS} or sklearn")
    domains: str = _opt("stdlib_docs,licenses", "comma-separated domains, in training order")
    steps: int = _opt(80, "AdamW steps per domain (every method)")
    pretrain_steps: int = _opt(800, "AdamW steps of general pre-training from random init")
    pretrain_lr: float = _opt(3e-3, "learning rate of the general pre-training")
    lr: float = _opt(1e-3, "learning rate of the domain training")
    matched_lr: float = _opt(3e-4, "slower lr of the second naive run (matched comparison)")
    batch_size: int = _opt(16, "chunks per batch")
    seq_len: int = _opt(64, "bytes per chunk")
    hidden: int = _opt(64, "model width")
    layers: int = _opt(2, "transformer blocks")
    heads: int = _opt(4, "attention heads")
    max_passages: int = _opt(1000, "passages per text set (train + eval)")
    eval_chunks: int = _opt(64, "eval chunks per set")
    importance_batches: int = _opt(4, "batches per DAS importance pass")
    mask_mode: str = _opt("update", "DAS soft-masking mode")
    contrastive_weights: str = _opt("", "comma-separated weights (empty: the config default)")
    contrastive_positive: str = _opt("detached", "DAS positive view: detached or grad")


# data ------------------------------------------------------------------------------------------


def chunks(texts: list[str], seq_len: int) -> Tensor:
    """UTF-8 bytes of the passages joined by newlines, cut into (n, seq_len) chunks."""
    data = torch.tensor(list("\n".join(texts).encode("utf-8")), dtype=torch.long)
    n = len(data) // seq_len
    return data[: n * seq_len].view(n, seq_len)


def as_batch(ids: Tensor) -> Batch:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def stream(data: Tensor, steps: int, batch_size: int, seed: int) -> list[Batch]:
    """`steps` batches of random chunks (the same for every method at one seed)."""
    g = torch.Generator().manual_seed(seed)
    return [
        as_batch(data[torch.randint(len(data), (batch_size,), generator=g)]) for _ in range(steps)
    ]


def fixed_batches(data: Tensor, n: int, batch_size: int) -> list[Batch]:
    return [as_batch(data[i : i + batch_size]) for i in range(0, min(n, len(data)), batch_size)]


# model -----------------------------------------------------------------------------------------


def make_model(s: Settings, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if s.arch == "llama":
        from transformers import LlamaForCausalLM

        cfg = tiny_llama_config(
            heads=s.heads, kv_heads=max(1, s.heads // 2), vocab_size=VOCAB, hidden_size=s.hidden,
            intermediate_size=2 * s.hidden, num_hidden_layers=s.layers,
            max_position_embeddings=s.seq_len,
        )  # fmt: skip
        return LlamaForCausalLM(cfg)
    if s.arch == "gpt2":
        from transformers import GPT2LMHeadModel

        cfg = tiny_gpt2_config(
            vocab_size=VOCAB, n_positions=s.seq_len, n_embd=s.hidden, n_layer=s.layers,
            n_head=s.heads,
        )  # fmt: skip
        return GPT2LMHeadModel(cfg)
    raise ValueError(f"arch must be 'llama' or 'gpt2', got {s.arch!r}")


@torch.no_grad()
def lm_loss(net: nn.Module, batches: list[Batch]) -> float:
    """Mean next-byte cross-entropy (nats/byte) over batches of equal-length chunks, eval mode."""
    was = net.training
    net.eval()
    loss = sum(float(net(**b).loss) for b in batches) / len(batches)
    net.train(was)
    return loss


def plain_loss(net: nn.Module) -> Any:
    """The model's own causal-LM loss of a batch."""
    return lambda b: net(**b).loss


def train(net: nn.Module, loss_fn: Any, opt: torch.optim.Optimizer, batches: list[Batch]) -> float:
    """One step per batch, gradient norm clipped to 1.0; seconds per step."""
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    start = time.perf_counter()
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(b).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return (time.perf_counter() - start) / max(len(batches), 1)


# one seed --------------------------------------------------------------------------------------


def run_seed(s: Settings, seed: int, weights: list[float], log: Any) -> dict[str, Any]:
    texts = load_text_domains(max_passages=s.max_passages, seed=seed)
    sets = {**texts.domains, "sklearn": texts.general}
    domains = s.domains.split(",")
    unknown = [d for d in [s.general, *domains] if d not in sets] + (
        [s.general] if s.general in domains else []
    )
    if unknown:
        raise SystemExit(f"bad --general/--domains {unknown}: choose distinct ones of {list(sets)}")
    train_data = {d: chunks(sets[d].train, s.seq_len) for d in domains}
    evals = {d: chunks(sets[d].eval, s.seq_len) for d in domains}
    evals["general"] = chunks(sets[s.general].eval, s.seq_len)
    eval_b = {k: fixed_batches(v, s.eval_chunks, s.batch_size) for k, v in evals.items()}
    imp_b = {
        d: fixed_batches(train_data[d], s.importance_batches * s.batch_size, s.batch_size)
        for d in domains
    }
    streams = {
        d: stream(train_data[d], s.steps, s.batch_size, seed * 1000 + t + 1)
        for t, d in enumerate(domains)
    }

    base = make_model(s, seed)
    general = chunks(sets[s.general].train, s.seq_len)
    opt = torch.optim.AdamW(base.parameters(), lr=s.pretrain_lr)
    train(base, plain_loss(base), opt, stream(general, s.pretrain_steps, s.batch_size, seed))
    base_loss = {k: lm_loss(base, v) for k, v in eval_b.items()}
    log(f"seed {seed}: base general {base_loss['general']:.3f}")

    runs: dict[str, dict[str, Any]] = {}
    plans = [("naive", s.lr, None), (f"naive@{s.matched_lr:g}", s.matched_lr, None)]
    plans += [(f"das w={w:g}", s.lr, w) for w in [0.0, *weights]]
    for name, lr, weight in plans:
        torch.manual_seed(seed)
        net = copy.deepcopy(base)
        model = None
        info: dict[str, Any] = {}
        if weight is not None:
            cfg = SoftMaskConfig(
                method="das",
                mask_mode=s.mask_mode,
                method_config=DASConfig(
                    contrastive_weight=weight, contrastive_positive=s.contrastive_positive
                ),
            )
            model = SoftMaskModel(net, cfg)
            general, info["general_unit_dropout"] = model.method.general_pass(imp_b[domains[0]])
            model.set_general_importance(general)
        stages, step_s = [], []
        for t, d in enumerate(domains):
            params = [p for p in net.parameters() if p.requires_grad]
            if model is None:
                opt = torch.optim.AdamW(params, lr=lr)
                step_s.append(train(net, plain_loss(net), opt, streams[d]))
            else:
                model.begin_task(t, name=d)
                opt = SoftMaskOptimizer(torch.optim.AdamW(params, lr=lr), model)
                step_s.append(train(net, model.training_loss, opt, streams[d]))
                model.end_task(imp_b[d])
            stages.append({k: lm_loss(net, v) for k, v in eval_b.items()})
        final = stages[-1]
        info.update(
            stages=stages,
            general=final["general"],
            mean_domain=sum(final[d] for d in domains) / len(domains),
            step_ms=1000 * sum(step_s) / len(step_s),
        )
        runs[name] = info
        log(
            f"seed {seed} {name:>14}: general {info['general']:.3f}, mean domain "
            f"{info['mean_domain']:.3f}, " + ", ".join(f"{d} {final[d]:.3f}" for d in domains)
        )
    naive = [(runs[k]["mean_domain"], runs[k]["general"]) for k in list(runs)[:2]]
    for name, info in runs.items():
        if name.startswith("das"):
            hit = at_domain_loss(naive, info["mean_domain"])
            info["naive_general_at_same_domain_loss"] = None if hit is None else hit[0]
            info["extrapolated"] = None if hit is None else hit[1]
    return {"seed": seed, "domains": domains, "base": base_loss, "runs": runs}


# report ----------------------------------------------------------------------------------------


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(results: list[dict[str, Any]]) -> str:
    """Markdown table: final losses per run (mean ± std over seeds) and the matched comparison.

    "DAS − naive" is the per-seed difference of DAS's general loss and naive's at the same mean
    domain loss (negative: DAS forgot less than naive would at equal domain learning).
    """
    domains = results[0]["domains"]
    names = list(results[0]["runs"])
    lines = [
        "| run | general loss | Δ general vs base | "
        + " | ".join(domains)
        + " | mean domain | naive general at same domain loss | DAS − naive | ms/step |",
        "|" + "---|" * (len(domains) + 7),
    ]
    base = [r["base"]["general"] for r in results]
    lines.append(
        f"| base | {_ms(base)} | 0 | "
        + " | ".join(_ms([r["base"][d] for r in results]) for d in domains)
        + f" | {_ms([sum(r['base'][d] for d in domains) / len(domains) for r in results])} "
        "| | | |"
    )
    for n in names:
        runs = [r["runs"][n] for r in results]
        matched = [x.get("naive_general_at_same_domain_loss") for x in runs]
        m = d = ""
        if not n.startswith("naive") and None not in matched:
            extra = " (extrapolated)" if any(x.get("extrapolated") for x in runs) else ""
            m = _ms(matched) + extra
            d = _ms([x["general"] - y for x, y in zip(runs, matched)])
        lines.append(
            f"| {n} | {_ms([x['general'] for x in runs])} | "
            f"{_ms([x['general'] - b for x, b in zip(runs, base)])} | "
            + " | ".join(_ms([x["stages"][-1][k] for x in runs]) for k in domains)
            + f" | {_ms([x['mean_domain'] for x in runs])} | {m} | {d} "
            f"| {statistics.mean(x['step_ms'] for x in runs):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(Settings):
        parser.add_argument(
            "--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
            help=f.metadata["help"] + " (default: %(default)s)",
        )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("results/das_causal_lm.json"))
    args = parser.parse_args()
    s = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    torch.set_num_threads(1)  # tiny models: one thread is fastest and leaves the other core free
    weights = (
        [float(w) for w in s.contrastive_weights.split(",")]
        if s.contrastive_weights
        else [DASConfig().contrastive_weight]
    )
    start = time.perf_counter()
    results = [
        run_seed(s, int(seed), weights, lambda m: print(m, flush=True))
        for seed in s.seeds.split(",")
    ]
    table = report(results)
    print(table)
    print(f"total {time.perf_counter() - start:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": asdict(s), "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
