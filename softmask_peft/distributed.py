"""Importance under data parallelism (torch DDP, Accelerate, torchrun, Trainer on several processes).

Each rank runs the importance pass on its shard of the data. The passes only *sum* per-batch
gradient information before normalising (SPG: Σ_b ∂L_h/∂p per head; DAS: Σ_b |∂L_b/∂m| and the
token count), so one sum-all-reduce of those sums before normalisation gives every rank the
sums over the whole dataset: importance identical on every rank and equal to a single process
on the same batches (up to float summation order). A NaN or Inf on any rank reaches every rank
through the sum, so the non-finite check that follows raises on all ranks together instead of
leaving the others waiting in a collective. Without an initialised process group (or with one
process) these functions return their input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T", Sequence[Tensor], Mapping[str, Tensor])


def world_size() -> int:
    """Processes in the default group (1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _device() -> torch.device:
    """Where a collective's tensors must live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors: T) -> T:
    """Sum every tensor over all ranks, in place, in one collective per dtype; returns `tensors`."""
    if world_size() == 1:
        return tensors
    values = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    device = _device()
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in values:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(device) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n
    return tensors


def all_reduce_count(count: int) -> int:
    """Sum an integer (a token or batch count) over all ranks."""
    if world_size() == 1:
        return count
    total = torch.tensor([count], dtype=torch.float64, device=_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total.item())
