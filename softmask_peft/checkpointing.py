"""Gradient checkpointing off for importance passes (transformers' per-module flag)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def gradient_checkpointing_off(model: nn.Module) -> Iterator[None]:
    """Switch transformers' gradient checkpointing off in every module for the block.

    Importance passes differentiate with `torch.autograd.grad` (SPG, batched over heads) or
    through virtual-mask hooks (DAS). Under checkpointing, measured on a tiny Llama: SPG with
    `use_reentrant=True` raises (".grad() is incompatible"), DAS with `use_reentrant=False`
    raises `CheckpointError: A different number of tensors was saved`, and DAS with
    `use_reentrant=True` silently returns all-zero importance. A pass holds no optimizer state,
    so the activations it keeps cost less than a training step's. The flag is restored after.
    """
    switched = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in switched:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in switched:
            m.gradient_checkpointing = True
