"""Per-task classifier heads for task-incremental learning (one head per task, task id known),
optionally with per-task low-rank adapters: capacity that grows with the tasks.

Task adapters (`adapter_rank > 0`). Every `nn.Linear` of the backbone gets, per task t, a
low-rank update routed by the task id, as in LoRA (Hu et al. 2021) but one per task:

    y = W x + b + s · B_t (A_t x),   A_t: (r, in), B_t: (out, r), s = `adapter_scale`

Task t's adapter runs only when task t is routed, so a later task never changes it and it never
changes an earlier task: the shared weights (soft-masked as usual) are the only path for
forgetting, and every task gets fresh capacity however saturated the shared weights are. The cost
is r·(in + out) parameters per task and linear layer, and the task id at inference
(task-incremental learning only).

How a new task's adapter starts (`adapter_init`):
- "fresh" (default): B_t = 0 and a new random A_t, so task t starts from the shared network.
- "previous": a copy of the previous task's adapter, so task t starts from the network that
  learned task t-1, as fine-tuning does (forward transfer); the copy is task t's own, so training
  it leaves task t-1 untouched. Better with the task id given; it spoils `forward_inferred`'s
  routing (the tasks' networks start alike and each stays sure on its predecessor's inputs).

`adapter_freeze_a=True` trains only B_t and keeps A_t fixed (LoRA-FA, Zhang et al. 2023): the
update s·B_t A_t is then linear in what trains, whose step stays as stable as a plain linear
layer's, while trained A and B (a product) oscillate at a plain-SGD learning rate that suits the
rest of the network. It needs a rank that spans the layer's input well (a fixed random A of low
rank limits what B can reach); see docs/guides/capacity.md for the measured trade-off.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial

import torch
from torch import Tensor, nn

from .errors import ConfigError, TaskOrderError

ADAPTERS = "task_adapters"  # the module holding every task's adapters
ADAPTER_INITS = ("fresh", "previous")  # how a new task's adapter starts


class LowRankUpdate(nn.Module):
    """x -> scale · B (A x): one task's adapter of one linear layer (B = 0 at creation)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's own initialisation
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * ((x @ self.A.T) @ self.B.T)


class MultiHeadClassifier(nn.Module):
    """A shared backbone followed by one linear head per task.

    `features(x, task_id)` runs the backbone once (through `task_id`'s adapters, if any);
    `forward(x, task_id)` returns one head's logits. SPG's importance pass uses `features` +
    `heads` to share one backbone forward between the current head's loss and the earlier
    heads' cross-head terms. `adapter_rank > 0` adds a task adapter to every `nn.Linear` of
    the backbone with each head (see the module docstring).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        adapter_rank: int = 0,
        adapter_scale: float = 2.0,
        adapter_init: str = "fresh",
        adapter_freeze_a: bool = False,
    ) -> None:
        super().__init__()
        if feature_dim <= 0:
            raise ValueError(f"feature_dim must be positive, got {feature_dim}")
        if isinstance(adapter_rank, bool) or not isinstance(adapter_rank, int) or adapter_rank < 0:
            raise ConfigError(f"adapter_rank must be an int >= 0, got {adapter_rank!r}")
        if not isinstance(adapter_scale, (int, float)) or not 0 < adapter_scale < math.inf:
            raise ConfigError(f"adapter_scale must be a positive number, got {adapter_scale!r}")
        if adapter_init not in ADAPTER_INITS:
            raise ConfigError(
                f"adapter_init must be one of {', '.join(map(repr, ADAPTER_INITS))}, got {adapter_init!r}"
            )
        if not isinstance(adapter_freeze_a, bool):
            raise ConfigError(f"adapter_freeze_a must be a bool, got {adapter_freeze_a!r}")
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.heads = nn.ModuleList()
        self.adapter_rank = adapter_rank
        self.adapter_scale = float(adapter_scale)
        self.adapter_init, self.adapter_freeze_a = adapter_init, adapter_freeze_a
        self._route: int | None = None  # the task whose adapters run, during one forward
        self.adapted_linears: list[tuple[int, int]] = []  # (in, out) of each adapted linear
        if adapter_rank:
            self.task_adapters = nn.ModuleList()
            for module in backbone.modules():
                if isinstance(module, nn.Linear):
                    # a bound method in a partial: copy.deepcopy re-binds it to the copy
                    module.register_forward_hook(partial(self._adapt, len(self.adapted_linears)))
                    self.adapted_linears.append((module.in_features, module.out_features))
            if not self.adapted_linears:
                raise ConfigError("adapter_rank > 0 needs an nn.Linear in the backbone; it has none")

    def _adapt(self, index: int, module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
        """Forward hook of the backbone's `index`-th linear: add the routed task's update."""
        task = self._route
        if task is None or task >= len(self.task_adapters):
            return out
        return out + self.task_adapters[task][index](args[0])

    @property
    def active_task(self) -> int | None:
        """The head `forward` uses when no `task_id` is given: the newest (None: no head).

        Read-only, derived from the heads: a `SoftMaskModel` passes its current task (the
        store's open task, else the last one learned) as `task_id` itself.
        """
        return len(self.heads) - 1 if len(self.heads) else None

    def add_head(self, num_classes: int) -> int:
        """Append a head with `num_classes` outputs (and the task's adapters), on the backbone's
        device and dtype; return its index."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        ref = next(self.backbone.parameters(), None)
        new: list[nn.Module] = [nn.Linear(self.feature_dim, num_classes)]
        if self.adapter_rank:
            new.append(
                nn.ModuleList(
                    LowRankUpdate(i, o, self.adapter_rank, self.adapter_scale)
                    for i, o in self.adapted_linears
                )
            )
        if ref is not None:
            new = [m.to(device=ref.device, dtype=ref.dtype) for m in new]
        self.heads.append(new[0])
        if self.adapter_rank:
            if self.adapter_init == "previous" and len(self.task_adapters):
                new[1].load_state_dict(self.task_adapters[-1].state_dict())
            for adapter in new[1]:
                adapter.A.requires_grad_(not self.adapter_freeze_a)
            self.task_adapters.append(new[1])
        return len(self.heads) - 1

    def task_parameters(self, task_id: int) -> Iterator[nn.Parameter]:
        """What only task `task_id` uses: its head and its adapters (a frozen A included)."""
        yield from self.heads[task_id].parameters()
        if self.adapter_rank:
            yield from self.task_adapters[task_id].parameters()

    def task_parameter_shapes(self, task_id: int, num_classes: int) -> dict[str, tuple[int, ...]]:
        """Names and shapes of what `add_head(num_classes)` creates as task `task_id`."""
        shapes = {
            f"heads.{task_id}.weight": (num_classes, self.feature_dim),
            f"heads.{task_id}.bias": (num_classes,),
        }
        for k, (i, o) in enumerate(self.adapted_linears):
            prefix = f"{ADAPTERS}.{task_id}.{k}"
            shapes[f"{prefix}.A"] = (self.adapter_rank, i)
            shapes[f"{prefix}.B"] = (o, self.adapter_rank)
        return shapes

    def _task(self, task_id: int | None) -> int:
        task = self.active_task if task_id is None else task_id
        if task is None or not 0 <= task < len(self.heads):
            raise TaskOrderError(
                f"no head for task {task!r}: the model has {len(self.heads)} head(s); "
                "call begin_task(t, num_classes=...) first"
            )
        return task

    def features(self, x: Tensor, task_id: int | None = None) -> Tensor:
        """The backbone's output, through `task_id`'s adapters (default: the newest task's)."""
        if not self.adapter_rank:
            return self.backbone(x)
        self._route = self._task(task_id)
        try:
            return self.backbone(x)
        finally:
            self._route = None

    def forward(self, x: Tensor, task_id: int | None = None) -> Tensor:
        task = self._task(task_id)
        return self.heads[task](self.features(x, task))

    def forward_inferred(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, task ids): each sample scored by the task whose head is most sure of it.

        For inputs whose task is not given (domain-incremental use): every learned task's head
        runs (through its adapters), and sample i takes task k_i = argmax_t logsumexp(f_t(x_i)),
        the lowest energy -logsumexp (the energy score of Liu et al. 2020, used here to route
        between tasks). Every head needs the same classes; the cost is one backbone pass per
        task with adapters, one in all without.
        """
        if not len(self.heads):
            raise TaskOrderError("no head yet: call begin_task(t, num_classes=...) first")
        widths = {h.out_features for h in self.heads}
        if len(widths) > 1:
            raise ConfigError(
                f"forward_inferred compares heads of the same classes; these have {sorted(widths)}"
            )
        logits = torch.stack(self.forward_all(x))  # (tasks, batch, classes)
        tasks = torch.logsumexp(logits, dim=-1).argmax(dim=0)
        return logits[tasks, torch.arange(logits.shape[1], device=logits.device)], tasks

    def forward_all(self, x: Tensor) -> list[Tensor]:
        """Logits of every head (one backbone pass without adapters, one per task with them)."""
        if self.adapter_rank:
            return [head(self.features(x, t)) for t, head in enumerate(self.heads)]
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
