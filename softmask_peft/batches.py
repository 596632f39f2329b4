"""The two batch shapes the library accepts: `(inputs, labels)` and HF-style dicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import BatchError


def split_batch(batch: Any) -> tuple[Any, Tensor | None, dict[str, Any]]:
    """Return (inputs, labels, hf_kwargs).

    `(x, y)` -> (x, y, {}); a mapping -> (None, batch["labels"], dict(batch)) so that
    `model(**hf_kwargs)` computes the model's own loss.
    """
    if isinstance(batch, Mapping):
        return None, batch.get("labels"), dict(batch)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1], {}
    shape = f"a {len(batch)}-tuple" if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise BatchError(
        f"a batch must be (inputs, labels) or a mapping with model inputs and 'labels', got {shape}"
    )


def logits_of(output: Any) -> Tensor:
    """A forward's logits: `.logits` of a transformers output, else the output itself."""
    return output.logits if hasattr(output, "logits") else output


def model_forward(model: nn.Module, hf: dict[str, Any], **extra: Any) -> Any:
    """`model(**hf)` for a dict batch; labels the model's own loss cannot index are a
    `BatchError` (torch raises a bare IndexError, "Target 9 is out of bounds")."""
    try:
        return model(**hf, **extra)
    except IndexError as e:
        if hf.get("labels") is None:
            raise
        raise BatchError(
            f"the batch's labels do not fit the model's output ({e}): labels must be class or "
            "token indices of the model's logits, or -100 to ignore"
        ) from e


def as_model_dtype(model: nn.Module, x: Any) -> Any:
    """A floating input in the model's floating dtype (float64 or half data on a float32
    model): the importance pass then measures the model as it is, not a dtype error."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return x
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return x if p is None or p.dtype == x.dtype else x.to(p.dtype)


def model_loss(output: Any) -> Tensor:
    """The loss a transformers model computed from a dict batch's `labels`."""
    loss = getattr(output, "loss", None)
    if loss is None:
        raise BatchError("the batch has no 'labels', so the model computed no loss; add them")
    return loss


def task_loss(model: nn.Module, batch: Any) -> Tensor:
    """The task loss: the model's own loss for dict batches, cross-entropy for `(x, y)`."""
    x, y, hf = split_batch(batch)
    if hf:
        return model_loss(model_forward(model, hf))
    return cross_entropy(logits_of(model(as_model_dtype(model, x))), y)


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy, refusing labels that are not class indices of `logits`; integer
    labels of any width are taken as class indices (torch wants int64)."""
    if (
        not isinstance(labels, Tensor)
        or labels.dtype.is_floating_point
        or labels.dtype.is_complex
        or labels.dtype == torch.bool
        or labels.dim() != 1
    ):
        raise BatchError(
            "labels must be a 1-D integer tensor of class indices, got "
            + (f"{labels.dtype} of shape {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__)
        )
    classes = logits.shape[-1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise BatchError(
            f"labels must lie in [0, {classes - 1}] for {classes} classes, got "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    return F.cross_entropy(logits, labels.long())
