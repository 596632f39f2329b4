"""SoftMaskModel: a thin wiring of config, importance method, importance store and keep-masks.

Ownership: the model owns its config (a copy, never mutated afterwards), its importance store
(importance, per-task history, task log, general importance), its keep-masks and, for a LoRA
PeftModel with `lora_mask="subspace"`, its `LoRASubspace` (covariances); nothing else writes
them. The importance method computes and returns; `persistence` reads and writes files.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .capacity import (
    SATURATION_THRESHOLD,
    CapacityReport,
    importance_stats,
    shape_task_importance,
)
from .checkpointing import gradient_checkpointing_off
from .config import SoftMaskConfig
from .device import device_state_problems
from .errors import ConfigError, ImportanceMismatchError, InputTypeError, TaskOrderError
from .heads import ADAPTERS, MultiHeadClassifier, expand_heads
from .importance import ImportanceMethod, method_spec
from .lora_subspace import LoRASubspace, elementwise_masked, subspace_for
from .masking import KeepMasks, build_keep_masks
from .persistence import head_shapes, importance_problem, load_checkpoint, save_checkpoint
from .selection import select_parameters
from .store import ImportanceStore, TaskRecord
from .weights import load_weights


class SoftMaskModel(nn.Module):
    """Wrap `base_model` for continual learning with soft-masked gradients.

    Lifecycle per task: `begin_task(t)` (adds a head on a `MultiHeadClassifier`, fixes the
    keep-masks from the importance of tasks < t), ordinary training with a
    `SoftMaskOptimizer`, then `end_task(train_batches)` (this task's importance,
    max-accumulated). Attribute access falls through to the base model, so `model.config`
    of a transformers model, `generate`, etc. work as usual; our config is `softmask_config`.
    """

    def __init__(self, base_model: nn.Module, config: SoftMaskConfig) -> None:
        super().__init__()
        if isinstance(base_model, SoftMaskModel):
            raise ConfigError("base_model is already a SoftMaskModel; wrap the model only once")
        if not isinstance(base_model, nn.Module):
            raise InputTypeError(
                f"base_model must be an nn.Module, got {type(base_model).__name__}"
            )
        if not isinstance(config, SoftMaskConfig):
            raise InputTypeError(f"config must be a SoftMaskConfig, got {type(config).__name__}")
        config = copy.deepcopy(config)  # ours from now on: a caller's later edits change nothing
        if config.head_modules is None and isinstance(base_model, MultiHeadClassifier):
            # regex full match: only the top-level task heads (and task adapters: per-task too)
            config.head_modules = f"heads|{ADAPTERS}" if base_model.adapter_rank else "heads"
        self.base_model = base_model
        self.softmask_config = config
        self.store = ImportanceStore()
        self.keep_masks: KeepMasks | None = None
        self.lora_subspace: LoRASubspace | None = subspace_for(base_model, config)
        self.method: ImportanceMethod = None  # type: ignore[assignment]  # set by _select
        self._select()

    def _select(self) -> None:
        """Resolve masked and head parameters; rebuild the method when the masked set changed.

        With a LoRA subspace mask, the LoRA factors it protects are masked by it, not by the
        method's element-wise importance (`elementwise_masked`)."""
        masked, heads = select_parameters(self.base_model, self.softmask_config)
        self.head_parameter_names = heads
        elementwise = elementwise_masked(masked, self.lora_subspace)
        if self.method is None or elementwise != self.method.masked:
            spec = method_spec(self.softmask_config.method)
            self.method = spec.method_class(
                self.base_model, elementwise, self.softmask_config.method_config
            )
        self.masked_parameter_names = masked

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward; a `MultiHeadClassifier` gets the current task's head.

        Which task is current is the store's to say (the one source): the open task, else the
        last one learned. An explicit `task_id` (keyword or second positional) wins.
        """
        if (
            isinstance(self.base_model, MultiHeadClassifier)
            and "task_id" not in kwargs
            and len(args) < 2
        ):
            task = self.store.open_task
            if task is None and self.store.num_tasks:
                task = self.store.num_tasks - 1
            if task is not None:
                kwargs["task_id"] = task
        return self.base_model(*args, **kwargs)

    # what the run has learned ------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        """Tasks whose importance has been recorded."""
        return self.store.num_tasks

    @property
    def current_task(self) -> int | None:
        """The task begun and not yet ended, if any."""
        return self.store.open_task

    @property
    def task_log(self) -> tuple[TaskRecord, ...]:
        """Name and class count of every task begun, in order."""
        return tuple(self.store.tasks)

    @property
    def importance(self) -> dict[str, Tensor]:
        """Accumulated importance A, keyed by the base model's names (DAS: unit tensors)."""
        return self.store.accumulated

    def task_importance(self, task_id: int) -> dict[str, Tensor]:
        """Importance of task `task_id` alone."""
        if not 0 <= task_id < self.store.num_tasks:
            raise TaskOrderError(
                f"no importance for task {task_id}: {self.store.num_tasks} recorded"
            )
        return self.store.history[task_id]

    def parameter_importance(self) -> dict[str, Tensor]:
        """Parameter-shaped A of every masked parameter (what the optimizer multiplies by)."""
        return self.method.parameter_importance(self.store.accumulated, self.store.general)

    def head_keep(self) -> float:
        """1 - ā, the scalar that scales head gradients (1 on the first task)."""
        return 1.0 if self.keep_masks is None else self.keep_masks.head_keep

    def capacity(self, threshold: float = SATURATION_THRESHOLD) -> CapacityReport:
        """How much of the network is still free: mean keep, the share of masked values with
        A > `threshold` (overall, per parameter, per task) and the scale each head trains at."""
        if not 0.0 <= threshold < 1.0:
            raise ConfigError(f"threshold must lie in [0, 1), got {threshold!r}")
        params = self.parameter_importance()
        new_head: float | None = None
        if self._unscaled_head_parameters():
            new_head = 1.0
        elif isinstance(self.base_model, MultiHeadClassifier) and self.current_task is not None:
            new_head = self.head_keep()
        overall = importance_stats(params, threshold)
        return CapacityReport(
            threshold=threshold,
            overall=overall,
            per_parameter={n: importance_stats({n: a}, threshold) for n, a in params.items()},
            per_task=tuple(importance_stats(t, threshold) for t in self.store.history),
            # between tasks: the factor the next task's heads will train at (1 - ā of the same A)
            head_keep=overall.mean_keep if self.keep_masks is None else self.head_keep(),
            new_head_keep=new_head,
        )

    # the task lifecycle --------------------------------------------------------------------------

    def begin_task(
        self, task_id: int, num_classes: int | None = None, name: str | None = None
    ) -> None:
        """Start task `task_id` (= the number of finished tasks): add its head, fix keep-masks."""
        if task_id != self.store.num_tasks:
            raise TaskOrderError(
                f"begin_task({task_id}) but {self.store.num_tasks} task(s) are finished; "
                f"the next task is {self.store.num_tasks}"
            )
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"a task name must be a str, got {type(name).__name__}")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
        added: list[Tensor] = []
        if isinstance(self.base_model, MultiHeadClassifier):
            if num_classes is None:
                raise TaskOrderError("a MultiHeadClassifier needs begin_task(t, num_classes=...)")
            if len(self.base_model.heads) <= task_id:
                self.base_model.add_head(num_classes)
                added = list(self.base_model.task_parameters(task_id))
        self.store.open(TaskRecord(name or f"task_{task_id}", num_classes))
        self.refresh_masks(added)

    def refresh_masks(self, added: list[Tensor] | None = None) -> None:
        """Re-select masked and head parameters and rebuild keep = 1 - A from the store.

        `begin_task` calls it (with the parameters it added, for the optimizer to adopt). While
        the same task stays open, the parameters added at its begin stay listed, so an optimizer
        that has not stepped yet still adopts them.
        """
        if self.keep_masks is not None:
            kept = self.keep_masks.added
            added = [*kept, *(p for p in added or [] if all(p is not q for q in kept))]
        self._select()
        params = dict(self.base_model.named_parameters())
        unscaled = self._unscaled_head_parameters()
        heads = [params[n] for n in self.head_parameter_names if id(params[n]) not in unscaled]
        subspace = self.lora_subspace.steps() if self.lora_subspace is not None else None
        self.keep_masks = build_keep_masks(
            params, self.parameter_importance(), heads, added, subspace
        )

    def _unscaled_head_parameters(self) -> set[int]:
        """ids of the head parameters trained without the 1 - ā scale.

        `head_scaling="except_new"`: the current task's own head (and task adapters) of a
        `MultiHeadClassifier` (no earlier task depends on them; earlier heads get no gradient
        from this task's loss).
        `"all"`, the official SPG code, and any shared head: none.
        """
        net = self.base_model
        if (
            self.softmask_config.head_scaling != "except_new"
            or not isinstance(net, MultiHeadClassifier)
            or self.current_task is None
            or self.current_task >= len(net.heads)
        ):
            return set()
        return {id(p) for p in net.task_parameters(self.current_task)}

    def end_task(self, train_batches: Iterable[Any]) -> dict[str, Tensor]:
        """Compute this task's importance on its training data, shape it by the capacity
        options (`capacity.py`; the paper's values change nothing) and accumulate it. A LoRA
        subspace mask then adds the task's input covariances and folds the adapter
        (`lora_subspace.py`; `train_batches` is read a second time for it)."""
        task = self.store.open_task
        if task is None:
            raise TaskOrderError("end_task() without a matching begin_task()")
        if task > 0 and self.keep_masks is not None and self.keep_masks.masked_steps == 0:
            warnings.warn(
                f"task {task} ended without a single soft-masked optimizer step: if it was "
                "trained, nothing protected the earlier tasks. Train through SoftMaskOptimizer, "
                "SoftMaskCallback (any transformers Trainer) or SoftMaskTrainer",
                RuntimeWarning,
                stacklevel=2,
            )
        was_training = self.base_model.training
        self.base_model.train()
        try:
            # callers often evaluate under no_grad; checkpointed recomputation breaks the pass
            with torch.enable_grad(), gradient_checkpointing_off(self.base_model):
                importance = (
                    self.method.run(
                        task, train_batches, self.store.general, self._shape_task_importance
                    )
                    if self.method.masked
                    else {}  # a LoRA model whose only trainable tensors are subspace-masked
                )
        finally:
            self.base_model.train(was_training)
        if self.lora_subspace is not None:
            self.lora_subspace.end_task(train_batches)
        self._close_task(importance)
        return importance

    def _shape_task_importance(self, importance: Mapping[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.softmask_config
        return shape_task_importance(importance, cfg.importance_sharpness, cfg.importance_budget)

    def _close_task(self, importance: Mapping[str, Tensor]) -> None:
        """Record the open task's importance (the store's one writer), accumulated by the
        config's rule (`importance_decay`); no task is open after."""
        self.store.close(importance, self.softmask_config.importance_decay)
        self.keep_masks = None  # no task is open: a step now is a lifecycle mistake

    def general_importance(self, batches: Iterable[Any]) -> dict[str, Tensor]:
        """Importance of what the base model already knows (DAS's proxy KL), kept in the store.

        Call it before `begin_task(0)`, on a sample of the first domain; it masks every
        domain from the first on and is saved with the checkpoint.
        """
        with gradient_checkpointing_off(self.base_model):
            return self.set_general_importance(self.method.general_importance(batches))

    def set_general_importance(self, importance: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Keep a general importance computed elsewhere: unit tensors in [0, 1], as
        `general_importance` returns them (for DAS, `model.method.general_pass` also returns
        the unit-dropout rate it used)."""
        if not isinstance(importance, Mapping) or not all(
            isinstance(v, Tensor) for v in importance.values()
        ):
            raise InputTypeError("general importance must be a mapping of names to tensors")
        shapes = self.method.importance_shapes()
        bad = [
            f"{k}: {problem}"
            for k in sorted(set(shapes) | set(importance))
            if (problem := importance_problem(importance.get(k), shapes.get(k)))
        ]
        if bad:
            raise ImportanceMismatchError(
                "general importance does not fit this model's units:\n  " + "\n  ".join(bad[:10])
            )
        self.store.set_general(importance)
        if self.store.open_task is not None:
            self.refresh_masks()
        return dict(self.store.general)

    def training_loss(self, batch: Any) -> Tensor:
        """The loss to train the current task on: the task loss, plus DAS's contrastive term."""
        return self.method.training_loss(batch, self.store.accumulated, self.store.general)

    # persistence ---------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config, importance (with the task log) and the base weights, as one commit."""
        subspace = self.lora_subspace.state_dict() if self.lora_subspace is not None else None
        save_checkpoint(directory, self.base_model, self.softmask_config, self.store, subspace)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | os.PathLike) -> SoftMaskModel:
        """Load what `save_pretrained` wrote onto `base_model`; validate everything first.

        Nothing in `base_model` changes unless every check passes (files present, config and
        format version known, weights and importance keys and shapes equal, importance in [0, 1]).
        """
        ckpt = load_checkpoint(base_model, directory)
        expand_heads(base_model, [t.num_classes for t in ckpt.store.tasks])
        load_weights(base_model, ckpt.weights)
        model = cls(base_model, ckpt.config)
        if model.lora_subspace is not None:  # checked against the model by load_checkpoint
            model.lora_subspace.apply(ckpt.subspace)
        model.store = ckpt.store
        if model.store.open_task is not None:
            model.refresh_masks()
        return model

    def load_device_state(self, state: Any) -> None:
        """Apply what a device learned (`softmask_peft.device.read_device_checkpoint`)."""
        base = self.base_model
        learned = list(state.tasks[: len(state.history)])  # declared, untrained heads stay out
        shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
        shapes |= head_shapes(base, learned)
        problems = device_state_problems(self, state, shapes)
        if problems:
            raise ImportanceMismatchError(
                f"device checkpoint {state.source!r} does not fit this model:\n  "
                + "\n  ".join(problems)
            )
        expand_heads(base, [t.num_classes for t in learned])
        self._select()  # the new heads are head parameters
        with torch.no_grad():
            for n, p in base.named_parameters():
                p.copy_(state.weights[n])
        self.store = ImportanceStore.from_parts(
            state.history, state.tasks, accumulated=state.accumulated, general=self.store.general
        )
        self.keep_masks = None


def get_softmask_model(model: nn.Module, config: SoftMaskConfig) -> SoftMaskModel:
    """Wrap `model` (any nn.Module, transformers model or PeftModel) for soft-masked continual learning."""
    return SoftMaskModel(model, config)
