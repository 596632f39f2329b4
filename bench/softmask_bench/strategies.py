"""Continual-learning methods as strategies with no-op hooks (avalanche's BasePlugin shape).

A runner calls, per task t: `begin_task` -> `make_optimizer` -> training with `penalty()` added
to the loss -> `end_task`. A strategy overrides only the moments it needs. `model` is the
module to train and evaluate (SPG replaces it with its `SoftMaskModel` wrapper).

* finetune: plain SGD, no protection (the lower bound).
* spg / spg-update: the library's SoftMaskModel + SoftMaskOptimizer (Konishi et al. 2023),
  SGD with grad masking, or AdamW with update masking.
* ewc: Elastic Weight Consolidation (Kirkpatrick et al. 2017) with the diagonal empirical
  Fisher of each task's training data.
"""

from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.optim import Optimizer

from softmask_peft import SoftMaskConfig, SoftMaskModel, SoftMaskOptimizer, get_softmask_model
from softmask_peft.heads import MultiHeadClassifier

from .benchmarks import Task
from .models import head_module_names
from .training import TrainConfig, xy_batches


class Strategy:
    """Base strategy; its hooks amount to fine-tuning with plain SGD (lr `cfg.lr`, no
    momentum, a new optimizer per task)."""

    name = ""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.model: nn.Module | None = None
        self.scenario = "task"

    def setup(self, net: nn.Module, scenario: str) -> None:
        """Take the freshly initialised network."""
        self.model, self.scenario = net, scenario

    def begin_task(self, task_id: int, task: Task) -> None:
        """Add the task's head in the task-incremental scenario."""
        if isinstance(self.model, MultiHeadClassifier):
            self.model.add_head(task.num_classes)

    def make_optimizer(self) -> Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.cfg.lr)

    def penalty(self) -> Tensor | None:
        """Regulariser added to the task loss (None: nothing)."""
        return None

    def end_task(self, task_id: int, task: Task) -> None:
        """Called with the best weights restored, before evaluation."""

    def info(self) -> dict[str, object]:
        """Method settings worth reporting beside the results."""
        return {}


class FinetuneStrategy(Strategy):
    """No protection against forgetting: the lower bound."""

    name = "finetune"


class SoftMaskStrategy(Strategy):
    """SPG through the library: `begin_task` fixes the keep-masks, `end_task` computes the
    task's importance on its training data (train mode) and max-accumulates it.

    After each task the wrapper is saved with `save_pretrained` and re-loaded with
    `from_pretrained` (the same base network), so the importance the next task is masked with
    went through the on-disk format in `importance_dtype` — uint8 quantisation included.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        mask_mode: str = "grad",
        optimizer: str = "sgd",
        importance_dtype: str = "float32",
    ) -> None:
        super().__init__(cfg)
        self.mask_mode, self.optimizer, self.importance_dtype = (
            mask_mode,
            optimizer,
            importance_dtype,
        )
        self.name = "spg" if mask_mode == "grad" else f"spg-{mask_mode}"

    def setup(self, net: nn.Module, scenario: str) -> None:
        config = SoftMaskConfig(
            method="spg",
            mask_mode=self.mask_mode,
            head_modules=head_module_names(scenario),
            importance_dtype=self.importance_dtype,
        )
        self.model, self.scenario = get_softmask_model(net, config), scenario

    def begin_task(self, task_id: int, task: Task) -> None:
        self.model.begin_task(task_id, num_classes=task.num_classes, name=task.name)

    def make_optimizer(self) -> Optimizer:
        params = self.model.parameters()
        if self.optimizer == "adamw":
            base = torch.optim.AdamW(
                params, lr=self.cfg.adamw_lr, weight_decay=self.cfg.weight_decay
            )
        else:
            base = torch.optim.SGD(params, lr=self.cfg.lr)
        return SoftMaskOptimizer(base, self.model, mask_mode=self.mask_mode)

    def end_task(self, task_id: int, task: Task) -> None:
        self.model.end_task(xy_batches(task.train, self.cfg.batch_size))
        with tempfile.TemporaryDirectory(prefix="softmask_bench_") as tmp:
            self.model.save_pretrained(tmp)
            self.model = SoftMaskModel.from_pretrained(self.model.base_model, tmp)

    def info(self) -> dict[str, object]:
        return {
            "mask_mode": self.mask_mode,
            "optimizer": self.optimizer,
            "importance_dtype": self.importance_dtype,
        }


class EWCStrategy(Strategy):
    """EWC: loss + λ/2 Σ_k Σ_p F_k[p] (θ_p − θ*_k[p])² over every finished task k.

    F_k = mean over task k's training samples of (∂ log p(y|x) / ∂θ)² with the true label
    (diagonal empirical Fisher), computed per sample in eval mode (no dropout noise). In the
    task-incremental scenario the per-task heads are left out of the penalty (an old head gets
    no gradient from the new task's loss); the shared head of the domain scenario is included.
    """

    name = "ewc"

    def __init__(self, cfg: TrainConfig, ewc_lambda: float) -> None:
        super().__init__(cfg)
        self.ewc_lambda = ewc_lambda
        self._anchors: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []

    def _penalized(self) -> dict[str, Tensor]:
        skip = "heads." if isinstance(self.model, MultiHeadClassifier) else None
        return {
            n: p
            for n, p in self.model.named_parameters()
            if p.requires_grad and not (skip and n.startswith(skip))
        }

    def penalty(self) -> Tensor | None:
        if not self._anchors or self.ewc_lambda == 0:
            return None
        params = self._penalized()
        total = torch.zeros(())
        for anchor, fisher in self._anchors:
            for n, p in params.items():
                total = total + (fisher[n] * (p - anchor[n]).square()).sum()
        return 0.5 * self.ewc_lambda * total

    def end_task(self, task_id: int, task: Task) -> None:
        self._anchors.append(
            (
                {n: p.detach().clone() for n, p in self._penalized().items()},
                self._fisher(task, task_id),
            )
        )

    def _fisher(self, task: Task, task_id: int) -> dict[str, Tensor]:
        model = self.model
        names = list(self._penalized())
        params = {n: p.detach() for n, p in model.named_parameters()}
        kwargs = {"task_id": task_id} if isinstance(model, MultiHeadClassifier) else {}

        def sample_loss(trainable: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            logits = functional_call(model, {**params, **trainable}, (x[None],), kwargs)
            return F.cross_entropy(logits, y[None])

        was_training = model.training
        model.eval()
        try:
            sums = {n: torch.zeros_like(params[n]) for n in names}
            for x, y in xy_batches(task.train, 256):
                g = vmap(grad(sample_loss), in_dims=(None, 0, 0))(
                    {n: params[n] for n in names}, x, y
                )
                for n in names:
                    sums[n] += g[n].square().sum(dim=0)
        finally:
            model.train(was_training)
        return {n: s / len(task.train) for n, s in sums.items()}

    def info(self) -> dict[str, object]:
        return {"ewc_lambda": self.ewc_lambda}
