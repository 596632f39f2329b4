"""`SoftMaskTrainer`: a transformers `Trainer` that trains a `SoftMaskModel` task after task.

    trainer = SoftMaskTrainer(model=softmask_model, args=TrainingArguments("out"), ...)
    for t, (train, evals) in enumerate(tasks):
        trainer.train_dataset, trainer.eval_dataset = train, evals
        trainer.begin_task(t)       # keep-masks from tasks < t, a fresh optimizer and scheduler
        trainer.train()
        trainer.end_task()          # importance on the (rank-sharded) train dataloader

What it changes in `Trainer`, and why:

* Trainer inspects `model.forward` for the columns to keep and the label names; a
  `SoftMaskModel` forwards `*args, **kwargs`, so it looks through the wrapper (and a
  `PeftModel` inside) at the task model, as Trainer does for a `PeftModel` itself.
* The optimizer Trainer builds (`args.optim`, weight-decay groups, ...) is wrapped in a
  `SoftMaskOptimizer`. Trainer calls `optimizer.step()` once per optimizer step, after gradient
  accumulation and after Accelerate unscales fp16 gradients, so masking sees the accumulated,
  unscaled gradients once. With grad masking and `max_grad_norm > 0` the clip norm is the norm
  of the *masked* gradients (mask -> clip -> step): clipping multiplies every gradient by one
  scalar, which commutes with the elementwise mask, so only the norm needs the mask.
* Every `checkpoint-N` and `save_model` folder is written by `SoftMaskModel.save_pretrained`:
  the softmask files beside weights the base library opens (`AutoModel...from_pretrained`,
  `PeftModel.from_pretrained`), and `softmask_trainer.json` marks the checkpoint complete.
  Resuming checks the checkpoint first (complete, `trainer_state.json` from the same save) and
  that the model carries its importance, so protection cannot silently be lost;
  `resume_from_checkpoint=True` takes the latest *complete* checkpoint.

The checkpoint marker and resume checks are `SoftMaskCallback`'s (`.callback`), which this
trainer adds to itself; the masking is its own optimizer's (mask -> clip -> step).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.utils.generic import can_return_loss, find_labels

from ..errors import ConfigError, InputTypeError, MissingFileError, TaskOrderError
from ..heads import expand_heads
from ..model import SoftMaskModel
from ..optim import SoftMaskOptimizer
from ..persistence import load_checkpoint
from ..weights import load_weights
from .callback import (
    SoftMaskCallback,
    check_same_state,
    check_trainer_checkpoint,
    latest_complete_checkpoint,
)


def task_model(model: SoftMaskModel) -> nn.Module:
    """The model whose `forward` Trainer should read: inside the wrapper and any PeftModel."""
    inner = model.base_model
    get_base = getattr(inner, "get_base_model", None)
    return get_base() if callable(get_base) else inner


class SoftMaskTrainer(Trainer):
    """`Trainer` for a `SoftMaskModel` (of a transformers model or a `PeftModel`).

    `mask_mode` overrides the model config's (`"update"` protects under AdamW, Trainer's default
    optimizer). Call `begin_task(t)` before and `end_task()` after each `train()`.
    """

    def __init__(
        self, model: SoftMaskModel, *args: Any, mask_mode: str | None = None, **kwargs: Any
    ):
        if not isinstance(model, SoftMaskModel):
            raise InputTypeError(
                f"SoftMaskTrainer trains a SoftMaskModel, got {type(model).__name__}: wrap it with "
                "get_softmask_model(model, SoftMaskConfig(...)) first"
            )
        self.mask_mode = mask_mode
        super().__init__(model, *args, **kwargs)
        inner = task_model(model)
        if self.args.label_names is None:
            self.label_names = find_labels(inner.__class__)
        self.can_return_loss = can_return_loss(inner.__class__)
        if hasattr(inner, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = inner.accepts_loss_kwargs
        else:
            params = inspect.signature(inner.forward).parameters.values()
            self.model_accepts_loss_kwargs = any(p.kind == p.VAR_KEYWORD for p in params)
        self.softmask_callback = SoftMaskCallback(
            model, mask_mode=mask_mode, manage_tasks=False, check_resume=False, loss_included=True
        )
        self.add_callback(self.softmask_callback)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """`Trainer.train`; a checkpoint to resume is checked first, and `True` means the
        latest complete one in `args.output_dir` (not a folder a killed save left behind)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = latest_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise MissingFileError(
                    f"no complete checkpoint to resume in {self.args.output_dir!r}"
                )
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            check_trainer_checkpoint(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # what Trainer reads from the model ---------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            names = list(inspect.signature(task_model(self.model).forward).parameters)
            self._signature_columns = names + list({"label", "label_ids", *self.label_names})

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """Trainer's loss, or `SoftMaskModel.training_loss` when the method adds a term to it
        (DAS: domain loss + contrastive_weight · InfoNCE), so `train()` minimises the method's loss."""
        if not self.model.method.adds_loss_term():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self.model.training_loss(inputs)
        return (loss, None) if return_outputs else loss

    # the task sequence -------------------------------------------------------------------------

    def begin_task(self, task_id: int, name: str | None = None) -> None:
        """`model.begin_task` and a fresh optimizer and scheduler for this task."""
        self.model.begin_task(task_id, name=name)
        self.optimizer = None
        self.lr_scheduler = None

    def end_task(self) -> dict[str, torch.Tensor]:
        """This task's importance on `train_dataset`, through Trainer's own train dataloader.

        Under several processes the dataloader gives each rank its shard and the importance
        pass sums over all of them (`softmask_peft.distributed`), so every rank ends with the
        same importance. Batches are moved to the model's device by the prepared dataloader.
        """
        importance = self.model.end_task(self.get_train_dataloader())
        self.optimizer = None
        self.lr_scheduler = None
        return importance

    # optimizer: masked, and mask -> clip -> step -----------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        base = super().create_optimizer(model)
        if not isinstance(base, SoftMaskOptimizer):
            self.optimizer = SoftMaskOptimizer(base, self.model, mask_mode=self.mask_mode)
        return self.optimizer

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        masks = self.model.keep_masks
        opt = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        if masks is None or not isinstance(opt, SoftMaskOptimizer) or opt.mask_mode != "grad":
            return super()._clip_grad_norm(model)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ConfigError(
                "grad masking with max_grad_norm > 0 is not supported under DeepSpeed/FSDP: use "
                "mask_mode='update' or max_grad_norm=0"
            )
        self.accelerator.unscale_gradients()
        factor: dict[int, Any] = {id(p): k for g in masks.groups for p, k in zip(g.params, g.keep)}
        factor.update({id(p): masks.head_keep for p in masks.heads})
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        squares = [
            (p.grad * factor[id(p)] if id(p) in factor else p.grad).float().pow(2).sum()
            for p in model.parameters()
            if p.grad is not None
        ]
        norm = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
        coef = torch.clamp(self.args.max_grad_norm / (norm + 1e-6), max=1.0)
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
        return norm

    # checkpoints ------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Every checkpoint and `save_model` folder: `SoftMaskModel.save_pretrained` (main process)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self.model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        """Load the checkpoint's weights; refuse unless the model already holds its importance.

        Protection lives in the importance, which Trainer knows nothing about: load a checkpoint
        with `SoftMaskModel.from_pretrained(base, checkpoint)` and `begin_task(...)` before
        `train(resume_from_checkpoint=checkpoint)`.
        """
        directory = Path(resume_from_checkpoint)
        base = self.model.base_model
        ckpt = load_checkpoint(base, directory)  # validates, changes nothing
        check_same_state(self.model, ckpt, directory)
        if self.model.current_task is None:
            raise TaskOrderError("call begin_task(t) before train(resume_from_checkpoint=...)")
        expand_heads(base, [t.num_classes for t in ckpt.store.tasks])
        load_weights(base, ckpt.weights)

    def _load_best_model(self) -> None:
        if self.state.best_model_checkpoint is not None:
            self._load_from_checkpoint(self.state.best_model_checkpoint)
