"""DAS's contrastive integration loss and the pooled sentence representation it compares."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mean_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean of the last hidden states over non-padding tokens: (B, T, D) -> (B, D)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def info_nce(
    anchor: Tensor, positive: Tensor, general: Tensor | None, temperature: float
) -> Tensor:
    """InfoNCE with cosine similarity, DAS's integration term.

    For sequence i, with s(u, v) = cos(u, v) / τ:

        L_i = -log  exp s(a_i, p_i) / (Σ_j exp s(a_i, p_j) + exp s(a_i, g_i))

    a_i = x_i under dropout pass 1, p_i = the *same* x_i under dropout pass 2 (the positive),
    p_j (j ≠ i) = the other sequences, g_i = x_i's "general" representation (unit outputs scaled
    by the accumulated importance), which the anchor is pushed away from. Returns mean_i L_i.
    Without `general` only the in-batch negatives remain.
    """
    if anchor.shape != positive.shape or anchor.dim() != 2:
        raise ValueError(
            f"anchor and positive must both be (batch, dim), got {tuple(anchor.shape)} "
            f"and {tuple(positive.shape)}"
        )
    a = F.normalize(anchor, dim=-1)
    logits = a @ F.normalize(positive, dim=-1).T
    if general is not None:
        if general.shape != anchor.shape:
            raise ValueError(
                f"general must match anchor {tuple(anchor.shape)}, got {tuple(general.shape)}"
            )
        own = (a * F.normalize(general, dim=-1)).sum(dim=-1, keepdim=True)
        logits = torch.cat([logits, own], dim=1)
    target = torch.arange(anchor.shape[0], device=anchor.device)
    return F.cross_entropy(logits / temperature, target)
