"""`SoftMaskCallback`: soft-masked continual learning inside ANY transformers `Trainer` subclass.

TRL's `SFTTrainer`, `Seq2SeqTrainer` or your own subclass keep their model, loss, collator and
optimizer; the callback only acts at the moments `Trainer` already announces:

    peft_model = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(...))
    softmask = get_softmask_model(peft_model, SoftMaskConfig())   # holds importance and masks
    callback = SoftMaskCallback(softmask)
    for task in tasks:                                             # one trainer per task is fine
        SFTTrainer(model=peft_model, args=SFTConfig(...), train_dataset=task,
                   callbacks=[callback]).train()

The trainer trains the model the user passed (the `PeftModel`), so TRL and PEFT see exactly
what they expect (`model.base_model` is PEFT's backbone); the `SoftMaskModel` beside it owns
importance, keep-masks and the files.

* `on_train_begin`: begins the next task if none is open (`begin_task(num_tasks)`), checks that
  the trainer trains the wrapped model, and resolves the mask mode from the optimizer the
  trainer built ("auto": grad masking for SGD, update masking otherwise).
* `on_pre_optimizer_step` / `on_optimizer_step`: the masking transform around Trainer's step
  (grad: `grad *= 1 - A`, after Trainer's clipping; update: `p <- p_old + (1 - A)(p_new - p_old)`).
  Trainer calls them once per optimizer step, after gradient accumulation.
* `on_save`: every `checkpoint-N` gets the softmask files (`SoftMaskModel.save_pretrained`) and,
  last, `softmask_trainer.json` = {global_step, save_id}: the marker of a complete checkpoint that
  pairs Trainer's `trainer_state.json` with the importance saved beside it.
* `on_train_end`: ends the task: the importance pass on the trainer's own (rank-sharded) train
  dataloader (gradient checkpointing is off for the pass: `softmask_peft.checkpointing`).

Resuming: `latest_complete_checkpoint(output_dir)` picks the newest checkpoint that a save
finished (Trainer's `resume_from_checkpoint=True` takes the highest number, even a folder a
killed process left half-written); `check_trainer_checkpoint(folder)` refuses one that is
incomplete or whose files come from different steps.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from softmask_format.atomic import atomic_write
from softmask_format.names import CONFIG_NAME, IMPORTANCE_NAME
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..errors import ConfigError, CorruptFileError, InputTypeError, MissingFileError, TaskOrderError
from ..lora_subspace import require_sgd
from ..masking import MASK_TRANSFORMS
from ..model import SoftMaskModel
from ..optim import SoftMaskOptimizer, resolve_mask_mode
from ..persistence import Checkpoint, load_checkpoint
from ..weights import open_safetensors

TRAINER_STATE_NAME = "trainer_state.json"  # transformers' name (trainer.TRAINER_STATE_NAME)
MARKER_NAME = "softmask_trainer.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# checkpoints ------------------------------------------------------------------------------------


def _saved_id(directory: Path) -> str | None:
    """The save id of the softmask files in `directory`, or None when there are none."""
    if not (directory / CONFIG_NAME).is_file() or not (directory / IMPORTANCE_NAME).is_file():
        return None
    with open_safetensors(directory / IMPORTANCE_NAME) as f:  # the header only
        return f.header.metadata.get("save_id", "")


def write_trainer_checkpoint(model: SoftMaskModel, directory: str | os.PathLike, step: int) -> None:
    """Softmask files into a Trainer checkpoint (unless a save already put them there), then
    the marker `softmask_trainer.json`, written last: its presence means the folder is complete."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingFileError(f"Trainer did not create the checkpoint folder {str(directory)!r}")
    save_id = _saved_id(directory)
    if save_id is None:
        model.save_pretrained(directory)
        save_id = _saved_id(directory)
    text = json.dumps({"global_step": int(step), "save_id": save_id}, indent=2, sort_keys=True)
    atomic_write(directory / MARKER_NAME, lambda tmp: Path(tmp).write_text(text + "\n"))


def check_trainer_checkpoint(directory: str | os.PathLike) -> int:
    """Refuse a Trainer checkpoint unless it is complete and its parts come from one save.

    Complete: `trainer_state.json`, the softmask files and the marker are all there (the marker
    is written last). One save: the marker's step equals `trainer_state.json`'s `global_step`
    and its save id the importance file's. Returns the checkpoint's global step.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingFileError(f"checkpoint {str(directory)!r} is not a directory")
    missing = [
        n for n in (TRAINER_STATE_NAME, CONFIG_NAME, IMPORTANCE_NAME, MARKER_NAME)
        if not (directory / n).is_file()
    ]
    if missing:
        raise MissingFileError(
            f"checkpoint {str(directory)!r} is incomplete (an interrupted save, or not written "
            f"with SoftMaskCallback/SoftMaskTrainer): it lacks {', '.join(missing)}"
        )
    try:
        marker = json.loads((directory / MARKER_NAME).read_text())
        trainer_step = json.loads((directory / TRAINER_STATE_NAME).read_text())["global_step"]
        step, save_id = int(marker["global_step"]), str(marker["save_id"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptFileError(f"cannot read the checkpoint {str(directory)!r}: {e}") from e
    if trainer_step != step:
        raise CorruptFileError(
            f"{str(directory)!r}: {TRAINER_STATE_NAME} is at step {trainer_step} but the softmask "
            f"files were saved at step {step}: the files come from different checkpoints"
        )
    if _saved_id(directory) != save_id:
        raise CorruptFileError(
            f"{str(directory)!r}: {IMPORTANCE_NAME} is not the one saved with this checkpoint "
            f"(save id differs from {MARKER_NAME})"
        )
    return step


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest-numbered `checkpoint-N` in `output_dir` that `check_trainer_checkpoint`
    accepts (None if there is none); incomplete folders are skipped with a warning."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()
    )
    for _, path in reversed(found):
        try:
            check_trainer_checkpoint(path)
        except (MissingFileError, CorruptFileError) as e:
            warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
            continue
        return str(path)
    return None


def check_same_state(model: SoftMaskModel, ckpt: Checkpoint, directory: Any) -> None:
    """Refuse to resume unless `model` carries exactly the checkpoint's finished-task importance
    (and, with the LoRA subspace mask, its covariances and folded weights)."""
    saved, mine = ckpt.store, model.store
    same = (
        saved.num_tasks == mine.num_tasks
        and saved.accumulated.keys() == mine.accumulated.keys()
        and all(torch.equal(v, mine.accumulated[k].cpu()) for k, v in saved.accumulated.items())
    )
    if not same:
        raise TaskOrderError(
            f"{str(directory)!r} holds the importance of {saved.num_tasks} finished task(s) "
            f"that this model does not carry ({mine.num_tasks} task(s)): resuming would train "
            "without their protection. Load it first: model = SoftMaskModel.from_pretrained("
            "base, checkpoint); model.begin_task(model.num_tasks)"
        )
    lora = model.lora_subspace
    if lora is not None and not lora.same_state(ckpt.subspace):
        raise TaskOrderError(
            f"{str(directory)!r} holds LoRA subspace state (covariances, folded base weights) "
            "that this model does not carry: resuming would train on other weights. Load it "
            "first: model = SoftMaskModel.from_pretrained(base, checkpoint)"
        )


# the callback -----------------------------------------------------------------------------------


def _inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside Accelerate's `AcceleratedOptimizer` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


class SoftMaskCallback(TrainerCallback):
    """Soft-mask the training of `model.base_model` by any `Trainer` subclass (see module doc).

    `mask_mode` overrides the model config's. `manage_tasks=True` (default) begins a task at
    `train()` start when none is open and ends it (importance pass) at `train()` end; with False,
    call `model.begin_task` / `model.end_task` yourself. `importance_batches` replaces the
    trainer's train dataloader in the importance pass (e.g. when the trainer's batches carry no
    `labels`, as in preference training): batches the wrapped model's forward accepts.
    `check_resume=False` skips the check that a resumed run carries its checkpoint's importance
    (for trainers that check before loading, as `SoftMaskTrainer`). A method that adds a term to
    the loss (DAS's contrastive term) needs a trainer whose `compute_loss` calls
    `model.training_loss` (`SoftMaskTrainer` does: `loss_included=True`); a callback cannot change
    the loss, so without it `train()` refuses rather than silently dropping the term.
    """

    def __init__(
        self,
        model: SoftMaskModel,
        mask_mode: str | None = None,
        manage_tasks: bool = True,
        importance_batches: Iterable[Any] | None = None,
        check_resume: bool = True,
        loss_included: bool = False,
    ) -> None:
        if not isinstance(model, SoftMaskModel):
            raise InputTypeError(
                f"SoftMaskCallback needs a SoftMaskModel, got {type(model).__name__}: wrap the "
                "model the trainer trains with get_softmask_model(model, SoftMaskConfig(...))"
            )
        self.model = model
        self.mask_mode = mask_mode
        self.manage_tasks = manage_tasks
        self.importance_batches = importance_batches
        self.check_resume = check_resume
        self.loss_included = loss_included
        self._transform: Any = None  # None: the trainer's optimizer masks itself, or no task
        self._began_here = False

    # training -----------------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        trained = kw.get("model")
        if trained is not None and trained is not self.model and trained is not self.model.base_model:
            raise ConfigError(
                f"the trainer trains a {type(trained).__name__} that is not the model this "
                "SoftMaskCallback wraps: pass the wrapped model itself to the trainer (with TRL, "
                "build the PeftModel yourself instead of passing peft_config=...)"
            )
        if self.model.method.adds_loss_term() and not self.loss_included:
            raise ConfigError(
                f"method {self.model.softmask_config.method!r} adds a term to the training loss "
                "(DAS's contrastive_weight > 0) that this trainer's compute_loss does not "
                "compute: use SoftMaskTrainer, override compute_loss to return "
                "softmask_model.training_loss(inputs) and pass loss_included=True, or set "
                "contrastive_weight=0"
            )
        resumed = state.global_step > 0
        if resumed and self.check_resume:
            self._check_resume(args, state)
        self._began_here = False
        if self.model.current_task is None:
            if not self.manage_tasks:
                raise TaskOrderError("call model.begin_task(t) before trainer.train()")
            if resumed:
                raise TaskOrderError(
                    "resuming a checkpoint taken during a task: load it with "
                    "SoftMaskModel.from_pretrained(model, checkpoint), which reopens that task"
                )
            self.model.begin_task(self.model.num_tasks)
            self._began_here = True
        opt = _inner_optimizer(kw.get("optimizer"))
        if self.model.lora_subspace is not None and opt is not None:
            require_sgd(getattr(opt, "base", opt))
        if isinstance(opt, SoftMaskOptimizer) or opt is None:
            self._transform = None  # SoftMaskTrainer's optimizer masks its own step
            return
        mode = self.mask_mode or self.model.softmask_config.mask_mode
        self._transform = MASK_TRANSFORMS[resolve_mask_mode(mode, opt)]()
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        named = dict(self.model.base_model.named_parameters())
        if self.model.num_tasks and not any(
            id(named[n]) in held for n in self.model.masked_parameter_names
        ):
            warnings.warn(
                "the trainer's optimizer holds none of the masked parameters: nothing it trains "
                "is soft-masked",
                stacklevel=2,
            )

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self._transform is not None:
            self._transform.before_step(self._masks())

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self._transform is not None:
            self._transform.after_step(self._masks())

    def _masks(self) -> Any:
        masks = self.model.keep_masks
        if masks is None:
            raise TaskOrderError(
                "an optimizer step with no task open: the task was ended during train()"
            )
        return masks

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._transform = None
        if not self.manage_tasks or self.model.current_task is None:
            return
        batches = self.importance_batches
        if batches is None:
            batches = kw.get("train_dataloader")
        if batches is None:
            raise TaskOrderError("no train dataloader to run the importance pass on")
        self.end_task(batches)

    def end_task(self, batches: Iterable[Any]) -> dict[str, torch.Tensor]:
        """`model.end_task(batches)`: this task's importance, max-accumulated."""
        return self.model.end_task(batches)

    # checkpoints ----------------------------------------------------------------------------------

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():  # save_model() alone has no callback event; checkpoints do
            write_trainer_checkpoint(self.model, folder, state.global_step)

    def _check_resume(self, args: TrainingArguments, state: TrainerState) -> None:
        """Trainer restored a checkpoint's step: the model must hold that checkpoint's importance."""
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            warnings.warn(
                f"resumed at step {state.global_step} from outside {args.output_dir!r}: the "
                "callback cannot check that the model carries that checkpoint's importance",
                stacklevel=2,
            )
            return
        check_trainer_checkpoint(folder)
        check_same_state(self.model, load_checkpoint(self.model.base_model, folder), folder)
