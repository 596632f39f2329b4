"""The two batch shapes the library accepts: `(inputs, labels)` and HF-style dicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor


def split_batch(batch: Any) -> tuple[Any, Tensor | None, dict[str, Any]]:
    """Return (inputs, labels, hf_kwargs).

    `(x, y)` -> (x, y, {}); a mapping -> (None, batch["labels"], dict(batch)) so that
    `model(**hf_kwargs)` computes the model's own loss.
    """
    if isinstance(batch, Mapping):
        return None, batch.get("labels"), dict(batch)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1], {}
    raise TypeError(
        "a batch must be (inputs, labels) or a mapping with model inputs and 'labels', "
        f"got {type(batch).__name__}"
    )
