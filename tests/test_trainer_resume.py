"""Resuming Trainer checkpoints: incomplete or mismatched folders are refused with our own errors,
`resume_from_checkpoint=True` skips a folder a killed save left behind, a refused save leaves no
folder (real transformers Trainer, tiny random BERT, CPU)."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import tiny_bert
from hf_data import examples, trainer_kwargs
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments

from softmask_peft import (
    ConfigError,
    CorruptFileError,
    MissingFileError,
    SoftMaskConfig,
    SoftMaskModel,
    get_softmask_model,
)
from softmask_peft.integrations.callback import (
    MARKER_NAME,
    TRAINER_STATE_NAME,
    check_trainer_checkpoint,
    latest_complete_checkpoint,
)
from softmask_peft.integrations.trainer import SoftMaskTrainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def args(out, **kw) -> TrainingArguments:
    defaults = dict(num_train_epochs=3, save_strategy="steps", save_steps=2)
    return TrainingArguments(**trainer_kwargs(out, **{**defaults, **kw}))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Task 0 trained for 6 steps with a checkpoint every 2: checkpoint-2, -4, -6."""
    out = tmp_path_factory.mktemp("run")
    model = get_softmask_model(tiny_bert(), SoftMaskConfig(mask_mode="update"))
    model.begin_task(0)
    SoftMaskTrainer(model, args(out), train_dataset=examples(8)).train()
    assert {p.name for p in out.iterdir()} >= {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    return out


def resume(folder, out, resume_from=None):
    model = SoftMaskModel.from_pretrained(tiny_bert(seed=4), folder)
    model.begin_task(model.num_tasks)
    trainer = SoftMaskTrainer(model, args(out), train_dataset=examples(8))
    trainer.train(resume_from_checkpoint=resume_from or str(folder))
    return trainer


def test_checkpoints_are_complete_and_resume(run, tmp_path):
    assert [check_trainer_checkpoint(run / f"checkpoint-{s}") for s in (2, 4, 6)] == [2, 4, 6]
    assert resume(run / "checkpoint-4", tmp_path).state.global_step == 6


def test_trainer_state_from_another_step_is_refused(run, tmp_path):
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(run / "checkpoint-4", ckpt)
    shutil.copy(run / "checkpoint-2" / TRAINER_STATE_NAME, ckpt / TRAINER_STATE_NAME)
    with pytest.raises(CorruptFileError, match="step 2 but the softmask files were saved at step 4"):
        resume(ckpt, tmp_path / "out")


def test_checkpoint_without_trainer_state_is_refused_by_name(run, tmp_path):
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(run / "checkpoint-4", ckpt)
    (ckpt / TRAINER_STATE_NAME).unlink()
    with pytest.raises(MissingFileError, match=f"lacks {TRAINER_STATE_NAME}"):
        resume(ckpt, tmp_path / "out")


def test_resume_true_skips_a_checkpoint_left_half_written(run, tmp_path):
    """kill -9 during the save of checkpoint-8: weights written, trainer state and marker not."""
    out = tmp_path / "out"
    shutil.copytree(run, out)
    half = out / "checkpoint-8"
    shutil.copytree(out / "checkpoint-6", half)
    for name in (TRAINER_STATE_NAME, MARKER_NAME):
        (half / name).unlink()
    with pytest.warns(UserWarning, match="checkpoint-8"):
        assert latest_complete_checkpoint(out) == str(out / "checkpoint-6")
    model = SoftMaskModel.from_pretrained(tiny_bert(seed=4), out / "checkpoint-4")
    model.begin_task(model.num_tasks)
    trainer = SoftMaskTrainer(model, args(out, num_train_epochs=4), train_dataset=examples(8))
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 8  # resumed at 6, not at the broken 8


def test_resume_true_with_no_complete_checkpoint_refuses(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    model = get_softmask_model(tiny_bert(), SoftMaskConfig())
    model.begin_task(0)
    trainer = SoftMaskTrainer(model, args(tmp_path), train_dataset=examples(8))
    with pytest.warns(UserWarning, match="incomplete"), pytest.raises(
        MissingFileError, match="no complete checkpoint"
    ):
        trainer.train(resume_from_checkpoint=True)


def test_refused_save_leaves_no_new_folder(tmp_path):
    peft = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"]))
    model = get_softmask_model(peft, SoftMaskConfig())
    peft.merge_and_unload()
    target = tmp_path / "new" / "save"
    with pytest.raises(ConfigError, match="merge_and_unload"):
        model.save_pretrained(target)
    assert not target.exists() and not target.parent.exists()


def test_marker_pairs_trainer_state_and_importance(run, tmp_path):
    ckpt = tmp_path / "checkpoint-6"
    shutil.copytree(run / "checkpoint-6", ckpt)
    marker = json.loads((ckpt / MARKER_NAME).read_text())
    (ckpt / MARKER_NAME).write_text(json.dumps({**marker, "save_id": "0" * 32}))
    with pytest.raises(CorruptFileError, match="not the one saved with this checkpoint"):
        check_trainer_checkpoint(ckpt)
