"""Per-task classifier heads for task-incremental learning (one head per task, task id known)."""

from __future__ import annotations

from torch import Tensor, nn

from .errors import TaskOrderError


class MultiHeadClassifier(nn.Module):
    """A shared backbone followed by one linear head per task.

    `features(x)` runs the backbone once; `forward(x, task_id)` returns one head's logits.
    SPG's importance pass uses `features` + `heads` to share one backbone forward between the
    current head's loss and the earlier heads' cross-head terms.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        if feature_dim <= 0:
            raise ValueError(f"feature_dim must be positive, got {feature_dim}")
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.heads = nn.ModuleList()

    @property
    def active_task(self) -> int | None:
        """The head `forward` uses when no `task_id` is given: the newest (None: no head).

        Read-only, derived from the heads: a `SoftMaskModel` passes its current task (the
        store's open task, else the last one learned) as `task_id` itself.
        """
        return len(self.heads) - 1 if len(self.heads) else None

    def add_head(self, num_classes: int) -> int:
        """Append a head with `num_classes` outputs (on the backbone's device); return its index."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        ref = next(self.backbone.parameters(), None)
        head = nn.Linear(self.feature_dim, num_classes)
        if ref is not None:
            head = head.to(device=ref.device, dtype=ref.dtype)
        self.heads.append(head)
        return len(self.heads) - 1

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward(self, x: Tensor, task_id: int | None = None) -> Tensor:
        task = self.active_task if task_id is None else task_id
        if task is None or not 0 <= task < len(self.heads):
            raise TaskOrderError(
                f"no head for task {task!r}: the model has {len(self.heads)} head(s); "
                "call begin_task(t, num_classes=...) first"
            )
        return self.heads[task](self.features(x))

    def forward_all(self, x: Tensor) -> list[Tensor]:
        """Logits of every head from one backbone pass."""
        z = self.features(x)
        return [head(z) for head in self.heads]


def expand_heads(model: nn.Module, num_classes: list[int | None]) -> None:
    """Give a fresh `MultiHeadClassifier` the heads a saved one had (before loading weights)."""
    if not isinstance(model, MultiHeadClassifier):
        return
    for n in num_classes[len(model.heads) :]:
        if n is None:
            raise TaskOrderError("saved config lacks the class count of a per-task head")
        model.add_head(n)
