"""Small, deterministic stand-ins for tests, benchmarks and the documentation's snippets.

Tiny random transformers configs (no download: every weight comes from `torch.manual_seed`),
token data with a learnable label, and `seed_importance` — the one way to give a model the
importance of a task without computing it (benchmarks and tests that need a known `A`). Like
`torch.testing`, this module is public but not part of the training API; transformers is
imported only when a config is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .model import SoftMaskModel

__all__ = [
    "seed_importance",
    "tiny_bert_config",
    "tiny_gpt2_config",
    "tiny_llama_config",
    "tiny_roberta_config",
    "token_task",
]

# one size for every tiny model: 2 blocks, hidden 16, 2 heads, FFN 24, 40 tokens, 16 positions
_TINY = dict(vocab_size=40, hidden=16, layers=2, heads=2, ffn=24, positions=16)


def tiny_bert_config(num_labels: int = 3, dropout: float = 0.0, **overrides: Any):
    """A 2-block BertConfig (hidden 16, 2 heads, FFN 24, 40 tokens); `overrides` win."""
    from transformers import BertConfig

    kwargs = dict(
        vocab_size=_TINY["vocab_size"],
        hidden_size=_TINY["hidden"],
        num_hidden_layers=_TINY["layers"],
        num_attention_heads=_TINY["heads"],
        intermediate_size=_TINY["ffn"],
        max_position_embeddings=_TINY["positions"],
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertConfig(**{**kwargs, **overrides})


def tiny_roberta_config(**overrides: Any):
    """The RoBERTa twin of `tiny_bert_config` (RoBERTa offsets positions by 2: 20 of them)."""
    from transformers import RobertaConfig

    kwargs = dict(
        vocab_size=_TINY["vocab_size"],
        hidden_size=_TINY["hidden"],
        num_hidden_layers=_TINY["layers"],
        num_attention_heads=_TINY["heads"],
        intermediate_size=_TINY["ffn"],
        max_position_embeddings=_TINY["positions"] + 4,
    )
    return RobertaConfig(**{**kwargs, **overrides})


def tiny_gpt2_config(dropout: float = 0.1, **overrides: Any):
    """A 2-block GPT2Config (hidden 16, 2 heads); GPT-2's own dropout is 0.1."""
    from transformers import GPT2Config

    kwargs = dict(
        vocab_size=_TINY["vocab_size"],
        n_positions=_TINY["positions"],
        n_embd=_TINY["hidden"],
        n_layer=_TINY["layers"],
        n_head=_TINY["heads"],
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    return GPT2Config(**{**kwargs, **overrides})


def tiny_llama_config(heads: int = 4, kv_heads: int = 2, **overrides: Any):
    """A 2-block LlamaConfig: gated MLP, grouped-query attention (`kv_heads` < `heads`), no dropout."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=_TINY["vocab_size"],
        hidden_size=_TINY["hidden"],
        intermediate_size=_TINY["ffn"],
        num_hidden_layers=_TINY["layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=_TINY["positions"],
    )
    return LlamaConfig(**{**kwargs, **overrides})


def token_task(
    seed: int,
    n: int = 32,
    seq_len: int = 8,
    vocab_size: int = _TINY["vocab_size"],
    num_labels: int = 3,
    batch_size: int | None = None,
    causal_lm: bool = False,
) -> list[dict[str, Tensor]]:
    """`n` token sequences of task `seed`, label = (first token + seed) mod `num_labels`.

    Examples (`batch_size=None`, what a Trainer dataset holds) or batches of `batch_size`;
    `causal_lm=True` makes the labels the inputs (a language-modelling domain).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (n, seq_len), generator=g)
    labels = ids.clone() if causal_lm else (ids[:, 0] + seed) % num_labels
    if batch_size is None:
        return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]
    return [
        {"input_ids": ids[i : i + batch_size], "labels": labels[i : i + batch_size]}
        for i in range(0, n, batch_size)
    ]


def seed_importance(
    model: SoftMaskModel,
    importance: Mapping[str, Tensor],
    num_classes: int | None = None,
    name: str | None = None,
) -> None:
    """Record `importance` as the next task's, as if `end_task` had measured it.

    Opens the next task if none is open (`begin_task`), then closes it the way `end_task`
    does, so the model stays the store's one writer and the masks are rebuilt at the next
    `begin_task`. For benchmarks and tests that need a known `A`.
    """
    task = model.current_task
    if task is None:
        task = model.num_tasks
        model.begin_task(task, num_classes=num_classes, name=name)
    model._close_task(importance)
