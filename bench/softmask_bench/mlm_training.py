"""MLM training loops: the MLM head alone, the whole-model adaptation, one step per batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .das_settings import PretrainSettings
from .mlm_batches import Batch, Encoded, mask_tokens, training_stream
from .mlm_eval import mlm_forward


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
    return train_steps(lambda b: mlm_forward(model, b)[0], params, opt, stream)


def train_steps(
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
