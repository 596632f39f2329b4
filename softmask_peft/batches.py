"""The two batch shapes the library accepts: `(inputs, labels)` and HF-style dicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
        return model_loss(model(**hf))
    return cross_entropy(logits_of(model(x)), y)


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy, refusing labels that are not class indices of `logits`."""
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dim() != 1:
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
    return F.cross_entropy(logits, labels)
