"""One task's training loop: new optimizer, then either ReduceLROnPlateau and early stopping on
validation loss with the best weights restored (as the SPG / HAT code) or a fixed number of
epochs at a constant lr (what a device does); plus evaluation."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from tqdm.auto import tqdm

from softmask_peft.errors import ConfigError
from softmask_peft.heads import MultiHeadClassifier

from .benchmarks import Split

PROTOCOLS = ("early_stopping", "fixed")


@dataclass(frozen=True)
class TrainConfig:
    """The per-task budget, shared by every method of a comparison.

    protocol "early_stopping" (the SPG paper's): at most `epochs` epochs per task; after
    `lr_patience` epochs without a better validation loss the lr is multiplied by `lr_factor`;
    training stops after `patience` such epochs or once the lr falls below `lr_min`, and the
    weights of the best validation loss are restored. Protocol "fixed": exactly `epochs` epochs
    at a constant lr, the last weights kept (validation data unused), as on a device.
    `lr` is plain SGD's (no momentum, the SPG paper's 0.25 by default); `adamw_lr` and
    `weight_decay` are used by AdamW methods (spg-update). `mlp_hidden` are the widths of the
    MLP backbone's hidden layers.
    """

    protocol: str = "early_stopping"
    epochs: int = 50
    batch_size: int = 32
    lr: float = 0.25
    adamw_lr: float = 1e-3
    weight_decay: float = 0.01
    patience: int = 10
    lr_patience: int = 3
    lr_factor: float = 1.0 / 3.0
    lr_min: float = 1e-4
    mlp_hidden: tuple[int, ...] = (256, 256)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not self.mlp_hidden or any(int(h) < 1 for h in self.mlp_hidden):
            raise ConfigError(f"mlp_hidden needs widths >= 1, got {self.mlp_hidden!r}")
        object.__setattr__(self, "mlp_hidden", tuple(int(h) for h in self.mlp_hidden))
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.lr_factor < 1:
            raise ConfigError(f"lr_factor must be in (0, 1), got {self.lr_factor}")
        if self.lr <= 0 or self.adamw_lr <= 0:
            raise ConfigError("learning rates must be > 0")

    def to_dict(self) -> dict[str, object]:
        """The settings a report prints; early-stopping options only under that protocol."""
        out = asdict(self)
        if self.protocol == "fixed":
            for key in ("patience", "lr_patience", "lr_factor", "lr_min"):
                del out[key]
        out["mlp_hidden"] = list(self.mlp_hidden)
        return out


class TensorBatches:
    """Batches of aligned tensors (inputs, labels, task ids), reshuffled every pass by a seeded
    generator when `seed` is given, in order otherwise.

    Slicing whole tensors avoids DataLoader's per-sample collation, which dominates the
    run time of these small models.
    """

    def __init__(self, tensors: Sequence[Tensor], batch_size: int, seed: int | None) -> None:
        if len({len(t) for t in tensors}) != 1:
            raise ConfigError("all tensors of a batch source must have the same length")
        self.tensors = tuple(tensors)
        self.batch_size = batch_size
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.tensors[0]) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        n = len(self.tensors[0])
        order = None if self.generator is None else torch.randperm(n, generator=self.generator)
        for i in range(0, n, self.batch_size):
            if order is None:
                yield tuple(t[i : i + self.batch_size] for t in self.tensors)
            else:
                idx = order[i : i + self.batch_size]
                yield tuple(t[idx] for t in self.tensors)


def task_tensors(splits: Sequence[tuple[Split, int]]) -> tuple[Tensor, Tensor, Tensor]:
    """(x, y, task id) of one or more (split, task id) pairs, concatenated; the task id picks
    the head in the task-incremental scenario."""
    return (
        torch.cat([s.x for s, _ in splits]),
        torch.cat([s.y for s, _ in splits]),
        torch.cat([torch.full((len(s),), t, dtype=torch.long) for s, t in splits]),
    )


def batches(
    splits: Sequence[tuple[Split, int]], batch_size: int, seed: int | None = None
) -> TensorBatches:
    """(x, y, task id) batches over the given splits; shuffled per pass when `seed` is given."""
    return TensorBatches(task_tensors(splits), batch_size, seed)


def xy_batches(split: Split, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """(x, y) batches in order, the shape `SoftMaskModel.end_task` consumes."""
    return [
        (split.x[i : i + batch_size], split.y[i : i + batch_size])
        for i in range(0, len(split), batch_size)
    ]


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def classification_loss(model: nn.Module, x: Tensor, y: Tensor, task_ids: Tensor) -> Tensor:
    """Mean cross-entropy, each sample scored by its own task's head.

    With a `MultiHeadClassifier` the backbone runs once and every task present in the batch
    uses its head (joint training mixes tasks); a shared-head model ignores the task ids.
    """
    net = _unwrap(model)
    if not isinstance(net, MultiHeadClassifier):
        return F.cross_entropy(model(x), y)
    tasks = torch.unique(task_ids).tolist()
    if len(tasks) == 1:
        return F.cross_entropy(model(x, task_id=tasks[0]), y)
    if net.adapter_rank:  # task adapters: one backbone pass per task
        parts = [(task_ids == t, net(x[task_ids == t], task_id=t)) for t in tasks]
    else:
        z = net.features(x)
        parts = [(task_ids == t, net.heads[t](z[task_ids == t])) for t in tasks]
    total = sum(F.cross_entropy(logits, y[sel], reduction="sum") for sel, logits in parts)
    return total / len(y)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Iterable[tuple[Tensor, Tensor, Tensor]], infer_task: bool = False
) -> tuple[float, float]:
    """(mean loss, accuracy in percent) in eval mode. `infer_task`: the task ids are not used;
    a `MultiHeadClassifier` picks each sample's head itself (`forward_inferred`)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    try:
        for x, y, tid in data:
            net = _unwrap(model)
            if infer_task:
                logits, _ = net.forward_inferred(x)
                loss_sum += float(F.cross_entropy(logits, y)) * len(y)
                correct += int((logits.argmax(dim=1) == y).sum())
                n += len(y)
                continue
            loss_sum += float(classification_loss(model, x, y, tid)) * len(y)
            if isinstance(net, MultiHeadClassifier):
                pred = torch.empty_like(y)
                for t in torch.unique(tid).tolist():
                    sel = tid == t
                    pred[sel] = net(x[sel], task_id=t).argmax(dim=1)
            else:
                pred = model(x).argmax(dim=1)
            correct += int((pred == y).sum())
            n += len(y)
    finally:
        model.train(was_training)
    return loss_sum / n, 100.0 * correct / n


def train_epoch(
    model: nn.Module,
    optimizer: Optimizer,
    train: Iterable[tuple[Tensor, Tensor, Tensor]],
    penalty: Callable[[Tensor, Tensor], Tensor | None] | None = None,
) -> None:
    """One pass over `train` in train mode: loss (+ penalty), backward, step."""
    model.train()
    for x, y, tid in train:
        optimizer.zero_grad()
        loss = classification_loss(model, x, y, tid)
        extra = penalty(x, tid) if penalty is not None else None
        if extra is not None:
            loss = loss + extra
        loss.backward()
        optimizer.step()


def fit(
    model: nn.Module,
    optimizer: Optimizer,
    train: Iterable[tuple[Tensor, Tensor, Tensor]],
    val: Iterable[tuple[Tensor, Tensor, Tensor]],
    cfg: TrainConfig,
    penalty: Callable[[Tensor, Tensor], Tensor | None] | None = None,
    desc: str = "train",
) -> list[float]:
    """Train one task under `cfg.protocol`; `penalty(x, task_ids)` is added to each batch's loss.

    Returns the validation loss after each epoch run (its length is the number of epochs).
    Early stopping restores the best-validation-loss weights; a non-finite validation loss
    never counts as an improvement, and if no epoch gives a finite one (divergence), the
    starting weights are restored. The fixed protocol keeps the last weights.
    """
    if cfg.protocol == "fixed":
        history = []
        for _ in tqdm(range(cfg.epochs), desc=desc, leave=False, disable=None):
            train_epoch(model, optimizer, train, penalty)
            history.append(evaluate(model, val)[0])
        return history
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience - 1
    )
    best_loss, best_state, since_best = math.inf, copy.deepcopy(model.state_dict()), 0
    history: list[float] = []
    bar = tqdm(range(cfg.epochs), desc=desc, leave=False, disable=None)
    for _ in bar:
        train_epoch(model, optimizer, train, penalty)
        val_loss, val_acc = evaluate(model, val)
        history.append(val_loss)
        bar.set_postfix(val_loss=f"{val_loss:.3f}", val_acc=f"{val_acc:.1f}")
        if val_loss < best_loss:
            best_loss, since_best = val_loss, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
        scheduler.step(val_loss if math.isfinite(val_loss) else math.inf)
        if since_best >= cfg.patience or optimizer.param_groups[0]["lr"] < cfg.lr_min:
            break
    model.load_state_dict(best_state)
    return history
