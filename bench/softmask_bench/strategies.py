"""Continual-learning methods as strategies with no-op hooks (avalanche's BasePlugin shape).

A runner calls, per task t: `begin_task` -> `make_optimizer` -> training with `penalty(x, task
ids)` added to each batch's loss -> `end_task`. A strategy overrides only the moments it needs.
`model` is the module to train and evaluate (SPG replaces it with its `SoftMaskModel` wrapper).
None of them stores data of earlier tasks.

* finetune: plain SGD, no protection (the lower bound).
* spg / spg-update: the library's SoftMaskModel + SoftMaskOptimizer (Konishi et al. 2023),
  SGD with grad masking, or AdamW with update masking, the new task's head unscaled (the
  default `head_scaling="except_new"`); spg-official scales every head (`"all"`).
* ewc: Elastic Weight Consolidation (Kirkpatrick et al. 2017) with the diagonal empirical
  Fisher of each task's training data.
* mas: Memory Aware Synapses (Aljundi et al. 2018), importance from the output's sensitivity.
* lwf: Learning without Forgetting (Li & Hoiem 2016), distillation of the previous model's
  outputs on the new task's inputs.

Data-storing references (they keep `memory_per_task` training samples of every finished task,
which the methods above never do; reported as references, not competitors):

* replay: experience replay (Chaudhry et al. 2019, "On Tiny Episodic Memories"), each batch's
  loss plus the cross-entropy of an equally large batch drawn from the memory.
* agem: A-GEM (Chaudhry et al. 2019, "Efficient Lifelong Learning with A-GEM"): the gradient g
  is projected when it points against the memory's gradient g_ref,
  g <- g - (g·g_ref / g_ref·g_ref) g_ref if g·g_ref < 0.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.optim import Optimizer

from softmask_peft import SoftMaskConfig, SoftMaskModel, SoftMaskOptimizer, get_softmask_model
from softmask_peft.heads import MultiHeadClassifier

from .benchmarks import Task
from .models import head_module_names
from .training import TrainConfig, classification_loss, xy_batches


class Strategy:
    """Base strategy; its hooks amount to fine-tuning with plain SGD (lr `cfg.lr`, no
    momentum, a new optimizer per task)."""

    name = ""
    infers_task = False  # True: evaluated without task ids (the model picks each sample's head)

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

    def penalty(self, x: Tensor, task_ids: Tensor) -> Tensor | None:
        """Regulariser added to the loss of the batch `x` (None: nothing)."""
        return None

    def end_task(self, task_id: int, task: Task) -> None:
        """Called with the best weights restored, before evaluation."""

    def info(self) -> dict[str, object]:
        """Method settings worth reporting beside the results."""
        return {}


class FinetuneStrategy(Strategy):
    """No protection against forgetting: the lower bound."""

    name = "finetune"


ADAPTER_INFO = ("adapter_rank", "adapter_scale", "adapter_init", "adapter_freeze_a")


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
        options: Mapping[str, Any] | None = None,
        name: str | None = None,
        adapter_rank: int = 0,
        adapter_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(cfg)
        self.adapter_rank = adapter_rank  # > 0: a task adapter and a head per task
        self.adapter_options = dict(adapter_options or {})  # MultiHeadClassifier's adapter_* keywords
        self.mask_mode, self.optimizer, self.importance_dtype = (
            mask_mode,
            optimizer,
            importance_dtype,
        )
        self.options = dict(options or {})  # SoftMaskConfig fields; None: the library defaults
        self.name = name or ("spg" if mask_mode == "grad" else f"spg-{mask_mode}")

    def setup(self, net: nn.Module, scenario: str) -> None:
        if self.adapter_rank:
            # domain-incremental: a head per task too, and the task inferred at test time
            self.infers_task = not isinstance(net, MultiHeadClassifier)
            width = net.head.in_features if self.infers_task else net.feature_dim
            net = MultiHeadClassifier(
                net.backbone, width, adapter_rank=self.adapter_rank, **self.adapter_options
            )
        config = SoftMaskConfig(
            method="spg",
            mask_mode=self.mask_mode,
            # with adapters, the model's own default: its heads and task adapters
            head_modules=None if self.adapter_rank else head_module_names(scenario),
            importance_dtype=self.importance_dtype,
            **self.options,
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
        c = self.model.softmask_config
        return {
            "mask_mode": self.mask_mode,
            "optimizer": self.optimizer,
            "importance_dtype": self.importance_dtype,
            "head_scaling": c.head_scaling,
            "importance_sharpness": c.importance_sharpness,
            "importance_budget": c.importance_budget,
            "importance_decay": c.importance_decay,
            "cross_heads": c.method_config.cross_heads,
            **{k: getattr(self.model.base_model, k) for k in ADAPTER_INFO if self.adapter_rank},
        }


def per_sample_mean(
    model: nn.Module,
    task: Task,
    task_id: int,
    names: list[str],
    sample_loss: Callable[[Tensor, Tensor], Tensor],
    reduce: Callable[[Tensor], Tensor],
) -> dict[str, Tensor]:
    """mean over task's training samples of `reduce(∂ sample_loss(f(x), y) / ∂θ)` for θ in
    `names`, per sample (vmap), in eval mode (no dropout noise). `f(x)` = the task's head."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    kwargs = {"task_id": task_id} if isinstance(model, MultiHeadClassifier) else {}

    def one(trainable: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, {**params, **trainable}, (x[None],), kwargs)
        return sample_loss(out, y[None])

    was_training = model.training
    model.eval()
    try:
        sums = {n: torch.zeros_like(params[n]) for n in names}
        for x, y in xy_batches(task.train, 256):
            g = vmap(grad(one), in_dims=(None, 0, 0))({n: params[n] for n in names}, x, y)
            for n in names:
                sums[n] += reduce(g[n]).sum(dim=0)
    finally:
        model.train(was_training)
    return {n: s / len(task.train) for n, s in sums.items()}


class QuadraticStrategy(Strategy):
    """loss + `scale` Σ_(anchor θ*, weight Ω) Σ_p Ω[p] (θ_p − θ*[p])².

    In the task-incremental scenario the per-task heads are left out of the penalty (an old head
    gets no gradient from the new task's loss); the shared head of the domain scenario is
    included.
    """

    def __init__(self, cfg: TrainConfig, scale: float) -> None:
        super().__init__(cfg)
        self.scale = scale
        self._anchors: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []

    def _penalized(self) -> dict[str, Tensor]:
        skip = "heads." if isinstance(self.model, MultiHeadClassifier) else None
        return {
            n: p
            for n, p in self.model.named_parameters()
            if p.requires_grad and not (skip and n.startswith(skip))
        }

    def penalty(self, x: Tensor, task_ids: Tensor) -> Tensor | None:
        if not self._anchors or self.scale == 0:
            return None
        params = self._penalized()
        total = torch.zeros(())
        for anchor, weight in self._anchors:
            for n, p in params.items():
                total = total + (weight[n] * (p - anchor[n]).square()).sum()
        return self.scale * total

    def _anchor(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self._penalized().items()}


class EWCStrategy(QuadraticStrategy):
    """EWC: loss + λ/2 Σ_k Σ_p F_k[p] (θ_p − θ*_k[p])² over every finished task k.

    F_k = mean over task k's training samples of (∂ log p(y|x) / ∂θ)² with the true label
    (diagonal empirical Fisher), computed per sample in eval mode (no dropout noise).
    """

    name = "ewc"

    def __init__(self, cfg: TrainConfig, ewc_lambda: float) -> None:
        super().__init__(cfg, 0.5 * ewc_lambda)
        self.ewc_lambda = ewc_lambda

    def end_task(self, task_id: int, task: Task) -> None:
        self._anchors.append((self._anchor(), self._fisher(task, task_id)))

    def _fisher(self, task: Task, task_id: int) -> dict[str, Tensor]:
        return per_sample_mean(
            self.model, task, task_id, list(self._penalized()), F.cross_entropy, torch.square
        )

    def info(self) -> dict[str, object]:
        return {"ewc_lambda": self.ewc_lambda}


class MASStrategy(QuadraticStrategy):
    """MAS (Aljundi et al. 2018): loss + λ Σ_p Ω[p] (θ_p − θ*[p])², θ* = the weights after the
    last task, Ω = Σ_k Ω_k summed over finished tasks.

    Ω_k[p] = mean over task k's training samples of |∂ ‖f(x)‖²₂ / ∂θ_p|, f = the task's logits,
    per sample in eval mode; labels are not used. λ = 1 as in the paper.
    """

    name = "mas"

    def __init__(self, cfg: TrainConfig, mas_lambda: float = 1.0) -> None:
        super().__init__(cfg, mas_lambda)
        self.mas_lambda = mas_lambda

    def end_task(self, task_id: int, task: Task) -> None:
        omega = per_sample_mean(
            self.model,
            task,
            task_id,
            list(self._penalized()),
            lambda out, _y: out.square().sum(),
            torch.abs,
        )
        if self._anchors:
            omega = {n: omega[n] + w for n, w in self._anchors[0][1].items()}
        self._anchors = [(self._anchor(), omega)]

    def info(self) -> dict[str, object]:
        return {"mas_lambda": self.mas_lambda}


class LwFStrategy(Strategy):
    """LwF (Li & Hoiem 2016): loss + α Σ_h KL(softmax(old_h(x)/T) ‖ softmax(new_h(x)/T)).

    `old` is a frozen copy of the model taken before the task starts (eval mode), h runs over
    the heads of earlier tasks (task-incremental) or the one shared head (domain-incremental),
    x over the new task's inputs; KL is the batch mean, T = 2, α = 1. The KL differs from the
    paper's cross-entropy by the teacher's entropy, a constant: same gradients. The paper's
    warm-up (training the new head alone first) is left out: every method gets the same budget.
    """

    name = "lwf"

    def __init__(self, cfg: TrainConfig, alpha: float = 1.0, temperature: float = 2.0) -> None:
        super().__init__(cfg)
        self.alpha, self.temperature = alpha, temperature
        self._old: nn.Module | None = None
        self._old_heads = 0

    def begin_task(self, task_id: int, task: Task) -> None:
        if task_id > 0:
            self._old = copy.deepcopy(self.model).eval().requires_grad_(False)
            self._old_heads = task_id
        super().begin_task(task_id, task)

    def _all_logits(self, net: nn.Module, x: Tensor) -> list[Tensor]:
        if isinstance(net, MultiHeadClassifier):
            z = net.features(x)
            return [net.heads[h](z) for h in range(self._old_heads)]
        return [net(x)]

    def penalty(self, x: Tensor, task_ids: Tensor) -> Tensor | None:
        if self._old is None:
            return None
        with torch.no_grad():
            targets = self._all_logits(self._old, x)
        total = torch.zeros(())
        for new, old in zip(self._all_logits(self.model, x), targets):
            total = total + F.kl_div(
                F.log_softmax(new / self.temperature, dim=1),
                F.log_softmax(old / self.temperature, dim=1),
                reduction="batchmean",
                log_target=True,
            )
        return self.alpha * total

    def info(self) -> dict[str, object]:
        return {"lwf_alpha": self.alpha, "lwf_temperature": self.temperature}


class EpisodicMemory:
    """`per_task` training samples of every finished task (x, y, task id), drawn with a seeded
    generator; `sample(n)` draws a batch uniformly from all of them."""

    def __init__(self, per_task: int, seed: int = 0) -> None:
        self.per_task = per_task
        self.generator = torch.Generator().manual_seed(seed)
        self.x: list[Tensor] = []
        self.y: list[Tensor] = []
        self.t: list[Tensor] = []

    def __bool__(self) -> bool:
        return bool(self.x)

    def add(self, task: Task, task_id: int) -> None:
        chosen = torch.randperm(len(task.train), generator=self.generator)[: self.per_task]
        self.x.append(task.train.x[chosen])
        self.y.append(task.train.y[chosen])
        self.t.append(torch.full((len(chosen),), task_id, dtype=torch.long))

    def sample(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        x, y, t = torch.cat(self.x), torch.cat(self.y), torch.cat(self.t)
        idx = torch.randint(len(y), (min(n, len(y)),), generator=self.generator)
        return x[idx], y[idx], t[idx]


class ReplayStrategy(Strategy):
    """Experience replay: loss + CE(memory batch of the same size), memory of earlier tasks."""

    name = "replay"

    def __init__(self, cfg: TrainConfig, memory_per_task: int = 50) -> None:
        super().__init__(cfg)
        self.memory = EpisodicMemory(memory_per_task)

    def penalty(self, x: Tensor, task_ids: Tensor) -> Tensor | None:
        if not self.memory:
            return None
        return classification_loss(self.model, *self.memory.sample(len(x)))

    def end_task(self, task_id: int, task: Task) -> None:
        self.memory.add(task, task_id)

    def info(self) -> dict[str, object]:
        return {"memory_per_task": self.memory.per_task}


class _ProjectedSGD(torch.optim.SGD):
    """Plain SGD whose step first lets `project` rewrite the gradients (A-GEM)."""

    def __init__(self, params, lr: float, project: Callable[[], None]) -> None:
        super().__init__(params, lr=lr)
        self._project = project

    def step(self, closure=None):  # noqa: ANN001 - torch.optim's signature
        self._project()
        return super().step(closure)


class AGEMStrategy(ReplayStrategy):
    """A-GEM: the step's gradient is projected onto the half-space where the memory's loss
    does not increase (to first order); the reference batch has `memory_batch` samples."""

    name = "agem"

    def __init__(self, cfg: TrainConfig, memory_per_task: int = 50, memory_batch: int = 256) -> None:
        super().__init__(cfg, memory_per_task)
        self.memory_batch = memory_batch

    def penalty(self, x: Tensor, task_ids: Tensor) -> Tensor | None:
        return None

    def make_optimizer(self) -> Optimizer:
        return _ProjectedSGD(self.model.parameters(), self.cfg.lr, self._project)

    @torch.no_grad()
    def _project(self) -> None:
        if not self.memory:
            return
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad.clone() for p in params]
        with torch.enable_grad():
            loss = classification_loss(self.model, *self.memory.sample(self.memory_batch))
            ref = torch.autograd.grad(loss, params, allow_unused=True)
        ref = [torch.zeros_like(g) if r is None else r for g, r in zip(grads, ref)]
        dot = sum(float((g * r).sum()) for g, r in zip(grads, ref))
        if dot >= 0:
            return
        norm = sum(float(r.square().sum()) for r in ref)
        for p, g, r in zip(params, grads, ref):
            p.grad.copy_(g - (dot / norm) * r)

    def info(self) -> dict[str, object]:
        return {"memory_per_task": self.memory.per_task, "memory_batch": self.memory_batch}
