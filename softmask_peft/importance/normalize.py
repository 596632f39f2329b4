"""The normalisation SPG and DAS share: raw gradient magnitudes -> importance in [0, 1]."""

from __future__ import annotations

import torch
from torch import Tensor


def normalize_importance(g: Tensor, dim: int | None = None) -> Tensor:
    """Map raw gradient sums to [0, 1]: |tanh((g - mean g) / std g)| (Konishi et al. 2023).

    Statistics are over the whole tensor (SPG's parameter, DAS's one block and unit kind) or,
    with `dim`, along that dimension of a stack of such tensors; unbiased std. Where the std is zero or undefined (a single element, or a
    constant tensor, all-zero included) the importance is 0: the official code divides by
    zero there and produces NaN, which would then poison the max-accumulation.
    """
    g = g.detach().to(torch.float32)
    if dim is None:
        if g.numel() < 2:
            return torch.zeros_like(g)
        std = g.std()
        if not torch.isfinite(std) or std == 0:
            return torch.zeros_like(g)
        return torch.tanh((g - g.mean()) / std).abs()
    if g.shape[dim] < 2:
        return torch.zeros_like(g)
    mean = g.mean(dim=dim, keepdim=True)
    std = g.std(dim=dim, keepdim=True)
    degenerate = ~torch.isfinite(std) | (std == 0)
    out = torch.tanh((g - mean) / torch.where(degenerate, torch.ones_like(std), std)).abs()
    return torch.where(degenerate, torch.zeros_like(out), out)
