"""`SoftMaskPlugin`: soft-masking inside Avalanche's own strategies (optional extra `avalanche`).

    model = get_softmask_model(MultiHeadClassifier(backbone, 128), SoftMaskConfig())
    net = SoftMaskTaskModule(model)                      # task labels pick the head
    strategy = Naive(model=net, optimizer=SGD(net.parameters(), lr=0.05),
                     train_mb_size=32, train_epochs=20, plugins=[SoftMaskPlugin(model)])
    for exp in benchmark.train_stream:
        strategy.train(exp)
        strategy.eval(benchmark.test_stream)

One training experience is one task of the model:

* `before_training_exp`: the strategy's optimizer is wrapped in `SoftMaskOptimizer` (once),
  then `model.begin_task(t, num_classes)` with t = the model's next task and num_classes =
  the experience's largest class label + 1 (the head must cover every label index).
* every optimizer step of the strategy is the wrapped step: the model's own keep-masks,
  "auto" = grad masking for `torch.optim.SGD`, update masking for Adam and the rest.
* `after_training_exp`: `model.end_task` on the experience's training data, batches of
  `train_mb_size` in order, Avalanche's (x, y, t) batches given to the pass as (x, y).

Why wrap the optimizer rather than mask in `before_update` / `after_update`: the masked step is
then `SoftMaskOptimizer.step` itself (the same code a plain loop runs, so the plugin cannot drift
from it: head scaling and keep factors are read from the model's `keep_masks`, never derived
here); masking runs last, after every other plugin's `before_update`, whatever the plugin order;
update masking (Adam) needs the step between its two halves; and the head `begin_task` adds is
adopted into the strategy's optimizer at the next step (Avalanche rebuilds its parameter list
before `before_training_exp`, so it would miss the head). Avalanche's `make_optimizer` keeps
working on the wrapper, which forwards `param_groups` and `state` to the base optimizer.

Task routing: with per-task heads (`softmask_peft.heads.MultiHeadClassifier`), give the strategy
`SoftMaskTaskModule(model)`, an Avalanche `MultiTaskModule`, so Avalanche's training and
evaluation call it with the batch's task labels; task label k is the model's head k (the labels
Avalanche's task-incremental benchmarks give: 0, 1, 2, ... in training order). A shared-head
model is given to the strategy as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule
from torch import Tensor
from torch.utils.data import DataLoader

from ..errors import BatchError, ConfigError, InputTypeError, TaskOrderError
from ..heads import MultiHeadClassifier
from ..masking import MASK_MODES
from ..model import SoftMaskModel
from ..optim import SoftMaskOptimizer

# logits of the classes a task's head lacks in a mixed-task batch, and of every class of a task
# no head was trained for yet (Avalanche's MultiHeadClassifier masks unused units with -1000)
MASK_VALUE = -1000.0


def _softmask_model(model: Any) -> SoftMaskModel:
    if not isinstance(model, SoftMaskModel):
        raise InputTypeError(
            f"model must be a SoftMaskModel, got {type(model).__name__} "
            "(wrap it with get_softmask_model(model, SoftMaskConfig()) first)"
        )
    return model


class SoftMaskTaskModule(MultiTaskModule):
    """Avalanche's view of a `SoftMaskModel` with per-task heads: task label k -> head k.

    `forward(x, task_labels)` runs head k on a batch of task k (as a plain forward of the model
    would); a batch mixing tasks gets one output row per sample, padded with `MASK_VALUE` to the
    widest head. In evaluation a task no head was trained for yet scores `MASK_VALUE` for every
    class (a uniform guess), where Avalanche's own MultiHeadClassifier would create an untrained
    head (changing the model and the random state while evaluating); in training it is an error.
    """

    def __init__(self, model: SoftMaskModel) -> None:
        super().__init__()
        model = _softmask_model(model)
        if not isinstance(model.base_model, MultiHeadClassifier):
            raise ConfigError(
                "SoftMaskTaskModule routes task labels to the heads of a "
                "softmask_peft.heads.MultiHeadClassifier; this model's base is a "
                f"{type(model.base_model).__name__}: give the SoftMaskModel to the strategy as it is"
            )
        self.softmask_model = model

    def forward(self, x: Tensor, task_labels: Tensor | int | None) -> Any:
        if task_labels is None:
            return self.forward_all_tasks(x)
        if not isinstance(task_labels, Tensor):
            return self.forward_single_task(x, int(task_labels))
        tasks = [int(t) for t in torch.unique(task_labels).tolist()]
        if len(tasks) == 1:  # the common case: the plain forward of head k, no copy
            return self.forward_single_task(x, tasks[0])
        outs = {t: self.forward_single_task(x[task_labels == t], t) for t in tasks}
        first = next(iter(outs.values()))
        out = first.new_full((len(x), max(o.shape[1] for o in outs.values())), MASK_VALUE)
        for t, o in outs.items():
            out[task_labels == t, : o.shape[1]] = o
        return out

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        heads = self.softmask_model.base_model.heads
        if 0 <= task_label < len(heads):
            return self.softmask_model(x, task_id=task_label)
        if self.training:
            raise TaskOrderError(
                f"no head for task label {task_label}: the model has {len(heads)} head(s); "
                "SoftMaskPlugin begins each training experience's task (add it to the strategy)"
            )
        width = max((h.out_features for h in heads), default=1)
        dtype = heads[0].weight.dtype if len(heads) else torch.get_default_dtype()
        return torch.full((len(x), width), MASK_VALUE, dtype=dtype, device=x.device)

    def forward_all_tasks(self, x: Tensor) -> dict[int, Tensor]:
        heads = self.softmask_model.base_model.heads
        return {t: self.forward_single_task(x, t) for t in range(len(heads))}


class SoftMaskPlugin(SupervisedPlugin):
    """Mask every optimizer step of an Avalanche strategy by `model`'s accumulated importance.

    `model` is the `SoftMaskModel` the strategy trains: the strategy's model itself (shared head)
    or `SoftMaskTaskModule(model)` (per-task heads). `mask_mode` overrides the model config's
    (`"auto"`: grad for SGD, update otherwise).
    """

    def __init__(self, model: SoftMaskModel, mask_mode: str | None = None) -> None:
        super().__init__()
        self.model = _softmask_model(model)
        mode = model.softmask_config.mask_mode if mask_mode is None else mask_mode
        if mode not in MASK_MODES:
            raise ConfigError(f"mask_mode must be one of {MASK_MODES}, got {mode!r}")
        self.mask_mode = mode

    def before_training(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        net = strategy.model
        routed = isinstance(net, SoftMaskTaskModule) and net.softmask_model is self.model
        if net is not self.model and not routed:
            raise ConfigError(
                f"the strategy trains a {type(net).__name__}, not this plugin's SoftMaskModel: "
                "give the strategy the SoftMaskModel (shared head) or SoftMaskTaskModule(model)"
            )
        if isinstance(self.model.base_model, MultiHeadClassifier) and not routed:
            raise ConfigError(
                "the model has per-task heads, but Avalanche calls a plain module without task "
                "labels; give the strategy SoftMaskTaskModule(model) so they pick the head"
            )

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        model, exp = self.model, strategy.experience
        if model.current_task is not None:
            raise TaskOrderError(
                f"task {model.current_task} is open: SoftMaskPlugin begins and ends one task per "
                "training experience; end it (model.end_task) or do not begin it yourself"
            )
        labels = sorted({int(t) for t in getattr(exp, "task_labels", [0])})
        if len(labels) != 1:
            raise ConfigError(
                f"experience {exp.current_experience} has task labels {labels}; SoftMaskPlugin "
                "learns one task per experience"
            )
        task = model.num_tasks
        if isinstance(model.base_model, MultiHeadClassifier) and labels[0] != task:
            raise TaskOrderError(
                f"experience {exp.current_experience} has task label {labels[0]} but the "
                f"model's next task is {task}: with per-task heads, task label k is head k, so "
                "experiences must come with task labels 0, 1, 2, ... in training order"
            )
        if not isinstance(strategy.optimizer, SoftMaskOptimizer):
            # before begin_task, so the optimizer adopts the head begin_task adds
            strategy.optimizer = SoftMaskOptimizer(strategy.optimizer, model, self.mask_mode)
        num_classes = max(int(c) for c in exp.classes_in_this_experience) + 1
        model.begin_task(task, num_classes, name=f"experience_{exp.current_experience}")

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        data = strategy.experience.dataset
        loader = DataLoader(
            data,
            batch_size=strategy.train_mb_size,
            shuffle=False,
            collate_fn=getattr(data, "collate_fn", None),
        )
        self.model.end_task(_xy_batches(loader, strategy.device))


def _xy_batches(loader: DataLoader, device: Any) -> Iterator[tuple[Any, Any]]:
    """Avalanche's (x, y, t) batches as the (x, y) the importance pass reads, on `device`.

    t is dropped: `before_training_exp` checked that the experience has one task label, and the
    pass attributes the whole experience to the model's open task.
    """
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            found = (
                f"{len(batch)} items" if isinstance(batch, (tuple, list)) else type(batch).__name__
            )
            raise BatchError(
                f"an Avalanche batch must be (x, y) or (x, y, task_labels), got {found}"
            )
        yield batch[0].to(device), batch[1].to(device)
