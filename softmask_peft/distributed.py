"""Importance under data parallelism (torch DDP, Accelerate, torchrun, Trainer on several processes).

Each rank runs the importance pass on its shard of the data. The passes only *sum* per-batch
gradient information before normalising (SPG: Σ_b ∂L_h/∂p per head; DAS: Σ_b |∂L_b/∂m| and the
token count), so one sum-all-reduce of those sums before normalisation gives every rank the
sums over the whole dataset: importance identical on every rank and equal to a single process
on the same batches (up to float summation order). A NaN or Inf on any rank reaches every rank
through the sum, so the non-finite check that follows raises on all ranks together instead of
leaving the others waiting in a collective. Without an initialised process group (or with one
process) these functions return their input.

Before any sum, the ranks agree (`agreement`, one small all-gather of fixed-size byte records,
no pickle): every rank reports whether its local pass succeeded and a digest of the names and
shapes it is about to sum. A rank whose pass raised (an empty shard, a bad batch) still joins
the agreement, so every rank raises at once (that rank its own error, the others a
`DistributedError` naming it) instead of waiting in the sum until the process group's timeout;
ranks holding different models raise `DistributedError` before a wrong sum (same sizes) or a
gloo abort (other sizes). A collective that fails underneath (a killed rank) is re-raised as
`DistributedError` too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import DistributedError

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


_MESSAGE_BYTES = 240
_RECORD_BYTES = 1 + 16 + _MESSAGE_BYTES  # status, digest of what is summed, error message


def _collective(what: str, run: Callable[[], Any]) -> Any:
    """Run a collective; a failure underneath (a rank died, the connection broke, the group's
    timeout) becomes `DistributedError`."""
    try:
        return run()
    except RuntimeError as e:  # gloo / NCCL errors (DistBackendError is a RuntimeError)
        raise DistributedError(
            f"{what}: a collective with the other ranks failed (a rank died or stopped "
            f"answering?): {e}"
        ) from e


def signature(shapes: Mapping[str, Any]) -> bytes:
    """A 16-byte digest of names and shapes: what ranks must share before summing."""
    text = repr(sorted((k, tuple(v)) for k, v in shapes.items()))
    return hashlib.sha256(text.encode()).digest()[:16]


@contextmanager
def agreement(what: str, shapes: Callable[[], Mapping[str, Any]]) -> Iterator[None]:
    """Run a rank's local pass inside; afterwards every rank learns whether all passes
    succeeded and sum the same names and shapes (`shapes()`), before any sum is taken.

    Raises on every rank together: the failing rank its own exception, the others
    `DistributedError` naming the failed rank and its error; different shapes or names:
    `DistributedError` on every rank. A no-op without a process group.
    """
    if world_size() == 1:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001  (re-raised below, after the others have heard of it)
        error = e
    record = torch.zeros(_RECORD_BYTES, dtype=torch.uint8)
    if error is not None:
        message = f"{type(error).__name__}: {error}".encode()[:_MESSAGE_BYTES]
        record[0] = 1
        record[17 : 17 + len(message)] = torch.frombuffer(bytearray(message), dtype=torch.uint8)
    else:
        record[1:17] = torch.frombuffer(bytearray(signature(shapes())), dtype=torch.uint8)
    device = _device()
    gathered = [torch.empty_like(record, device=device) for _ in range(world_size())]
    _collective(what, lambda: dist.all_gather(gathered, record.to(device)))
    records = [r.cpu() for r in gathered]
    if error is not None:
        raise error
    failed = [(rank, bytes(r[17:].tolist()).rstrip(b"\0").decode(errors="replace"))
              for rank, r in enumerate(records) if int(r[0])]
    if failed:
        raise DistributedError(
            f"{what}: the pass failed on rank(s) {[r for r, _ in failed]}, so no rank sums: "
            + "; ".join(f"rank {r}: {m}" for r, m in failed)
        )
    digests = [bytes(r[1:17].tolist()) for r in records]
    if len(set(digests)) > 1:
        groups = {d: [r for r, x in enumerate(digests) if x == d] for d in digests}
        raise DistributedError(
            f"{what}: the ranks hold different models (names or shapes of the importance "
            f"differ between rank groups {list(groups.values())}); every rank must wrap the "
            "same model with the same config"
        )


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
        _collective("importance sum", lambda flat=flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
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
    _collective("token count", lambda: dist.all_reduce(total, op=dist.ReduceOp.SUM))
    return int(total.item())
