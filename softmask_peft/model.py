"""SoftMaskModel: a thin wiring of config, importance method, importance store and keep-masks."""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._atomic import commit_files, ensure_directory, recover_directory
from .config import SoftMaskConfig
from .constants import CONFIG_NAME, IMPORTANCE_NAME
from .errors import (
    CorruptFileError,
    ImportanceMismatchError,
    MissingFileError,
    SaveLocationError,
    TaskOrderError,
)
from .heads import MultiHeadClassifier, expand_heads
from .importance import METHODS
from .masking import KeepMasks, build_keep_masks
from .selection import select_parameters
from .store import ImportanceStore
from .weights import read_weights, save_weights


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
        if not isinstance(base_model, nn.Module):
            raise TypeError(f"base_model must be an nn.Module, got {type(base_model).__name__}")
        if not isinstance(config, SoftMaskConfig):
            raise TypeError(f"config must be a SoftMaskConfig, got {type(config).__name__}")
        if config.head_modules is None and isinstance(base_model, MultiHeadClassifier):
            config.head_modules = "heads"  # regex full match: only the top-level task heads
        self.base_model = base_model
        self.softmask_config = config
        self.store = ImportanceStore()
        self.current_task: int | None = None
        self.keep_masks: KeepMasks | None = None
        self.mask_version = 0
        self.added_parameters: list[nn.Parameter] = []
        self._select()
        self.method = METHODS[config.method](self)

    def _select(self) -> None:
        self.masked_parameter_names, self.head_parameter_names = select_parameters(
            self.base_model, self.softmask_config
        )

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    @property
    def num_tasks(self) -> int:
        """Tasks whose importance has been recorded."""
        return self.store.num_tasks

    @property
    def importance(self) -> dict[str, Tensor]:
        """Accumulated importance A, keyed by the base model's names."""
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
        return self.method.parameter_importance(self.store.accumulated)

    def head_keep(self) -> float:
        """1 - ā, the scalar that scales head gradients (1 on the first task)."""
        return 1.0 if self.keep_masks is None else self.keep_masks.head_keep

    def begin_task(
        self, task_id: int, num_classes: int | None = None, name: str | None = None
    ) -> None:
        """Start task `task_id` (= the number of finished tasks): add its head, fix keep-masks."""
        if task_id != self.store.num_tasks:
            raise TaskOrderError(
                f"begin_task({task_id}) but {self.store.num_tasks} task(s) are finished; "
                f"the next task is {self.store.num_tasks}"
            )
        cfg = self.softmask_config
        if isinstance(self.base_model, MultiHeadClassifier):
            if num_classes is None:
                raise TaskOrderError("a MultiHeadClassifier needs begin_task(t, num_classes=...)")
            if len(self.base_model.heads) <= task_id:
                self.base_model.add_head(num_classes)
                self.added_parameters.extend(self.base_model.heads[task_id].parameters())
            self.base_model.active_task = task_id
        if len(cfg.task_names) == task_id:
            cfg.task_names.append(name or f"task_{task_id}")
            cfg.task_num_classes.append(num_classes)
        self.current_task = task_id
        self.refresh_masks()

    def refresh_masks(self) -> None:
        """Re-select masked and head parameters and rebuild keep = 1 - A from the store.

        `begin_task` calls it; call it yourself after changing the model's heads or the store
        by hand (e.g. after loading a device checkpoint).
        """
        self._select()
        importance = self.parameter_importance()  # DAS: general importance masks domain 0
        if not importance:
            self.keep_masks = None
        else:
            params = dict(self.base_model.named_parameters())
            heads = [params[n] for n in self.head_parameter_names]
            self.keep_masks = build_keep_masks(params, importance, heads)
        self.mask_version += 1

    def end_task(self, train_batches: Iterable[Any]) -> dict[str, Tensor]:
        """Compute this task's importance on its training data and accumulate it by max."""
        if self.current_task is None or self.current_task != self.store.num_tasks:
            raise TaskOrderError("end_task() without a matching begin_task()")
        was_training = self.base_model.training
        self.base_model.train()
        try:
            with torch.enable_grad():  # callers often evaluate under no_grad
                importance = self.method.run(
                    self.current_task, train_batches, desc=f"importance task {self.current_task}"
                )
        finally:
            self.base_model.train(was_training)
        self.store.add_task(importance)
        self.current_task = None
        return importance

    # persistence ---------------------------------------------------------------------------

    @staticmethod
    def load_device_checkpoint(model: SoftMaskModel, directory: str | os.PathLike) -> SoftMaskModel:
        """Restore weights and importance that an edge device learned (see `softmask_peft.export`)."""
        from .export import load_device_checkpoint

        return load_device_checkpoint(model, directory)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config, importance and the base weights into `directory`, as one commit.

        The files are staged and committed as a set (`_atomic.commit_files`): a crash leaves the
        previous checkpoint or, once committed, the new one, which the next load finishes
        moving into place. Weights and importance also carry the same random `save_id`, so a
        pair of files from two different saves is refused at load time.
        """
        directory = ensure_directory(directory)
        cfg = self.softmask_config
        save_id = uuid.uuid4().hex

        def write(staging: Path) -> None:
            save_weights(self.base_model, staging, save_id)
            self.store.save(staging / IMPORTANCE_NAME, cfg.importance_dtype, save_id)
            cfg.save_pretrained(staging)

        commit_files(directory, write)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | os.PathLike) -> SoftMaskModel:
        """Load what `save_pretrained` wrote onto `base_model`; validate everything first.

        Nothing in `base_model` changes unless every check passes (files present, config and
        format version known, weights and importance keys and shapes equal, importance in [0, 1]).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise MissingFileError(f"{str(directory)!r} is not a directory")
        try:
            recover_directory(directory)
        except OSError as e:
            raise SaveLocationError(
                f"{str(directory)!r} holds a committed but unfinished save that cannot be "
                f"completed: {e}"
            ) from e
        missing = [n for n in (CONFIG_NAME, IMPORTANCE_NAME) if not (directory / n).is_file()]
        if missing:
            raise MissingFileError(f"{str(directory)!r} lacks {', '.join(missing)}")
        config = SoftMaskConfig.from_pretrained(directory)
        grows = isinstance(base_model, MultiHeadClassifier) and len(base_model.heads) < len(
            config.task_num_classes
        )
        probe = copy.deepcopy(base_model) if grows else base_model  # validate before changing it
        if grows:
            expand_heads(probe, config.task_num_classes)
        apply_weights, weights_id = read_weights(probe, directory)
        store = ImportanceStore.load(
            directory / IMPORTANCE_NAME, cls(probe, config).method.importance_shapes()
        )
        if weights_id != store.save_id:
            raise CorruptFileError(
                f"the weights and {IMPORTANCE_NAME} in {str(directory)!r} come from different "
                "saves (an interrupted save_pretrained?); refusing to pair them"
            )
        if not store.num_tasks <= len(config.task_names) <= store.num_tasks + 1:
            raise ImportanceMismatchError(
                f"{CONFIG_NAME} names {len(config.task_names)} task(s) but {IMPORTANCE_NAME} "
                f"holds {store.num_tasks}"
            )
        if grows:
            expand_heads(base_model, config.task_num_classes)
            apply_weights, _ = read_weights(base_model, directory)
        model = cls(base_model, config)
        model.store = store
        apply_weights()
        return model
