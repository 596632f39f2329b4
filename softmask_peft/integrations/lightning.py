"""`SoftMaskCallback`: soft-masking inside a Lightning `Trainer.fit` (optional extra `lightning`).

    callback = SoftMaskCallback(softmask_model)          # the SoftMaskModel your module trains
    for t, loader in enumerate(task_loaders):
        pl.Trainer(callbacks=[callback], ...).fit(module, loader)   # begin_task / end_task inside

One `fit` is one task: `on_fit_start` begins the next task (unless you called
`model.begin_task(t, ...)` yourself, e.g. to pass `num_classes`), `on_fit_end` runs `end_task`
on the fit's train dataloader (the rank's shard under DDP; the importance sums are all-reduced).
`configure_optimizers` runs at every fit, so each task gets a fresh optimizer.

Masking ("auto" picks grad for SGD, update otherwise): grad mode multiplies the gradients in `on_before_optimizer_step`, which Lightning
calls once per optimizer step, after gradient accumulation and AMP unscaling and before
gradient clipping (mask -> clip -> step). Update mode must see the step itself, so the
callback wraps the fit's optimizers in `SoftMaskOptimizer(mask_mode="update")` at `on_fit_start`.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.optim import Optimizer

from ..errors import ConfigError, EmptyDataError, InputTypeError
from ..masking import MASK_MODES, GradMask, refuse_non_finite_gradients
from ..model import SoftMaskModel
from ..optim import SoftMaskOptimizer, resolve_mask_mode


class SoftMaskCallback(pl.Callback):
    """Mask the optimizer steps of every fit by `model`'s accumulated importance."""

    def __init__(self, model: SoftMaskModel, mask_mode: str | None = None) -> None:
        if not isinstance(model, SoftMaskModel):
            raise InputTypeError(f"model must be a SoftMaskModel, got {type(model).__name__}")
        mode = model.softmask_config.mask_mode if mask_mode is None else mask_mode
        if mode not in MASK_MODES:
            raise ConfigError(f"mask_mode must be one of {MASK_MODES}, got {mode!r}")
        self.model = model
        self.mask_mode = mode
        self._mode = mode  # resolved against the fit's optimizer in on_fit_start ("auto")
        self._grad_mask = GradMask()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_trains_model(pl_module)
        optimizers = trainer.strategy.optimizers
        if not optimizers:
            raise ConfigError(
                "SoftMaskCallback: the fit has no optimizer (configure_optimizers returned "
                "none), so there is no step to mask"
            )
        if self.model.current_task is None:
            self.model.begin_task(self.model.num_tasks)
        self._mode = resolve_mask_mode(self.mask_mode, optimizers[0])
        if self._mode == "update":
            trainer.strategy.optimizers = [
                o
                if isinstance(o, SoftMaskOptimizer)
                else SoftMaskOptimizer(o, self.model, "update")
                for o in trainer.strategy.optimizers
            ]

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # NaN/Inf gradients: refused before the step writes anything (mask -> clip -> step)
        refuse_non_finite_gradients(p for g in optimizer.param_groups for p in g["params"])
        if self._mode != "grad" or self.model.keep_masks is None:
            return
        self._grad_mask.mask_gradients(self.model.keep_masks)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        task = self.model.current_task
        if loader is None or trainer.num_training_batches == 0:
            raise EmptyDataError(
                f"SoftMaskCallback: the fit ran no training batch (an empty train dataloader, "
                f"limit_train_batches=0, or the hook called outside Trainer.fit), so task {task} "
                "has no data to measure its importance on; it stays open: fit again with data"
            )
        batches = (trainer.strategy.batch_to_device(b) for b in _iterate(loader))
        self.model.end_task(batches)

    def _check_trains_model(self, pl_module: pl.LightningModule) -> None:
        """Refuse a callback bound to another SoftMaskModel than the one `pl_module` trains:
        it would mask parameters that get no gradient and let the real ones train unmasked."""
        trained = {id(p) for p in pl_module.parameters()}
        named = dict(self.model.base_model.named_parameters())
        if not any(id(named[n]) in trained for n in self.model.masked_parameter_names):
            raise ConfigError(
                f"SoftMaskCallback: {type(pl_module).__name__} does not train the SoftMaskModel "
                "this callback was built with (none of its masked parameters is a parameter of "
                "the LightningModule): build the callback with the model the module trains"
            )


def _iterate(loader: Any) -> Any:
    """The batches of a fit's train dataloader (one loader; Lightning may hand back a list)."""
    if isinstance(loader, (list, tuple)) and len(loader) == 1:
        loader = loader[0]
    return iter(loader)
