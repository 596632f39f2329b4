"""SoftMaskTrainer with the real transformers Trainer and peft (tiny random BERT, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_bert
from hf_data import examples, trainer_kwargs
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import AutoModelForSequenceClassification, TrainerCallback, TrainingArguments

from softmask_peft import SoftMaskConfig, SoftMaskModel, TaskOrderError, get_softmask_model
from softmask_peft.integrations.trainer import SoftMaskTrainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def args(tmp_path, **kw) -> TrainingArguments:
    return TrainingArguments(**trainer_kwargs(tmp_path, **kw))


def run_task(trainer: SoftMaskTrainer, t: int, data) -> None:
    trainer.train_dataset = data
    trainer.begin_task(t)
    trainer.train()
    trainer.end_task()


def test_default_arguments_train_and_evaluate_with_metrics(tmp_path):
    model = get_softmask_model(tiny_bert(), SoftMaskConfig())
    seen = []

    def metrics(pred):
        seen.append(pred.label_ids.shape)
        return {"acc": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    trainer = SoftMaskTrainer(
        model, args(tmp_path), eval_dataset=examples(8, seed=5), compute_metrics=metrics
    )
    assert trainer.label_names == ["labels"]
    run_task(trainer, 0, examples(8))
    out = trainer.evaluate()
    assert "eval_loss" in out and "eval_acc" in out and seen == [(8,)]
    assert model.num_tasks == 1 and model.head_parameter_names == [
        "classifier.weight",
        "classifier.bias",
    ]


class Grads(TrainerCallback):
    """Records the gradients Trainer hands to `optimizer.step()` (after clipping)."""

    def __init__(self, model):
        self.model, self.before = model, []

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.before.append(
            {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}
        )


def test_grad_mask_then_clip_once_per_accumulated_step(tmp_path):
    model = get_softmask_model(tiny_bert(), SoftMaskConfig(mask_mode="grad"))
    trainer = SoftMaskTrainer(model, args(tmp_path, optim="sgd", max_grad_norm=0.0))
    run_task(trainer, 0, examples(8))
    importance = model.parameter_importance()
    keep = {n: 1 - a for n, a in importance.items()}
    head = 1 - sum(float(a.sum()) for a in importance.values()) / sum(
        a.numel() for a in importance.values()
    )
    rec = Grads(model.base_model)
    stepped = []

    def hook(opt, a, k):
        if isinstance(opt, torch.optim.SGD):
            stepped.append(
                {
                    n: p.grad.clone()
                    for n, p in model.base_model.named_parameters()
                    if p.grad is not None
                }
            )

    handle = register_optimizer_step_pre_hook(hook)
    try:
        trainer.args.gradient_accumulation_steps = 2
        trainer.args.max_grad_norm = 1e-3
        trainer.add_callback(rec)
        run_task(trainer, 1, examples(16, seed=3))
    finally:
        handle.remove()
    assert len(stepped) == len(rec.before) == trainer.state.global_step == 2
    for before, after in zip(rec.before, stepped):
        for n, g in after.items():
            factor = keep.get(n, head if n.startswith("classifier") else 1.0)
            torch.testing.assert_close(g, before[n] * factor)  # masked exactly once
        norm = torch.stack([g.pow(2).sum() for g in after.values()]).sum().sqrt()
        assert float(norm) == pytest.approx(1e-3, rel=1e-3)  # clipped after masking


def test_checkpoints_hold_softmask_files_and_open_with_automodel(tmp_path):
    model = get_softmask_model(tiny_bert(), SoftMaskConfig(mask_mode="update"))
    trainer = SoftMaskTrainer(model, args(tmp_path, save_strategy="steps", save_steps=1))
    run_task(trainer, 0, examples(8))
    trainer.args.output_dir = str(tmp_path / "task1")
    run_task(trainer, 1, examples(8, seed=3))
    ckpt = tmp_path / "task1" / "checkpoint-2"
    names = {p.name for p in ckpt.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "softmask_config.json",
        "softmask_importance.safetensors",
    } <= names
    hf = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
    batch = {"input_ids": torch.stack([e["input_ids"] for e in examples(4)])}
    model.eval()
    torch.testing.assert_close(hf(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    loaded = SoftMaskModel.from_pretrained(tiny_bert(seed=5), ckpt)
    assert loaded.num_tasks == 1  # saved during task 1: task 0's importance protects it
    assert all(
        torch.equal(loaded.importance[k], model.task_importance(0)[k]) for k in loaded.importance
    )
    trainer.save_model(str(tmp_path / "final"))
    final = SoftMaskModel.from_pretrained(tiny_bert(seed=5), tmp_path / "final")
    assert final.num_tasks == 2


def test_resume_from_checkpoint_keeps_protection_and_matches_an_unbroken_run(tmp_path):
    def first_task(out):
        model = get_softmask_model(tiny_bert(), SoftMaskConfig(mask_mode="update"))
        trainer = SoftMaskTrainer(
            model, args(out, save_strategy="steps", save_steps=2, num_train_epochs=2)
        )
        run_task(trainer, 0, examples(8))
        trainer.args.output_dir = str(out / "task1")
        trainer.train_dataset = examples(8, seed=3)
        trainer.begin_task(1)
        return model, trainer

    model, trainer = first_task(tmp_path / "a")
    trainer.train()
    unbroken = {k: v.clone() for k, v in model.base_model.state_dict().items()}

    ckpt = tmp_path / "a" / "task1" / "checkpoint-2"
    bare = get_softmask_model(tiny_bert(seed=7), SoftMaskConfig(mask_mode="update"))
    bare.begin_task(0)
    untouched = {k: v.clone() for k, v in bare.base_model.state_dict().items()}
    refused = SoftMaskTrainer(bare, args(tmp_path / "b"), train_dataset=examples(8, seed=3))
    with pytest.raises(TaskOrderError, match="protection"):
        refused.train(resume_from_checkpoint=str(ckpt))
    assert all(torch.equal(v, untouched[k]) for k, v in bare.base_model.state_dict().items())

    resumed = SoftMaskModel.from_pretrained(tiny_bert(seed=7), ckpt)
    resumed.begin_task(resumed.num_tasks)
    t2 = SoftMaskTrainer(
        resumed, args(tmp_path / "c", num_train_epochs=2), train_dataset=examples(8, seed=3)
    )
    t2.train(resume_from_checkpoint=str(ckpt))
    state = resumed.base_model.state_dict()
    for k, v in unbroken.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=1e-6)


def lora_model(seed=0):
    cfg = LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    return get_peft_model(tiny_bert(seed=seed), cfg)


def test_peft_lora_in_trainer_writes_adapter_checkpoints(tmp_path):
    model = get_softmask_model(lora_model(), SoftMaskConfig(mask_mode="update", lora_mask="factors"))
    assert model.head_parameter_names and all(
        "modules_to_save" in n for n in model.head_parameter_names
    )
    trainer = SoftMaskTrainer(model, args(tmp_path, save_strategy="steps", save_steps=2))
    run_task(trainer, 0, examples(8))
    ckpt = tmp_path / "checkpoint-2"
    names = {p.name for p in ckpt.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "softmask_importance.safetensors",
    } <= names
    assert "model.safetensors" not in names
    assert SoftMaskModel.from_pretrained(lora_model(), ckpt).num_tasks == 0  # mid-task 0
    trainer.save_model(str(tmp_path / "final"))
    pm = PeftModel.from_pretrained(tiny_bert(), tmp_path / "final", is_trainable=True)
    loaded = SoftMaskModel.from_pretrained(pm, tmp_path / "final")
    assert loaded.num_tasks == 1
    assert all(torch.equal(loaded.importance[k], model.importance[k]) for k in model.importance)
    batch = {"input_ids": torch.stack([e["input_ids"] for e in examples(4)])}
    model.eval()
    pm.eval()
    torch.testing.assert_close(pm(**batch).logits, model(**batch).logits, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["trainer", "callback"])
def test_importance_pass_under_two_processes_equals_one(tmp_path, mode):
    """torchrun with 2 gloo processes: each rank's importance pass sees its shard of Trainer's
    train dataloader, and every rank ends with the importance one process computes, through
    SoftMaskTrainer and through a plain Trainer with SoftMaskCallback."""
    worker = Path(__file__).resolve().parent / "trainer_dist_worker.py"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    for cmd, out in (
        ([sys.executable, str(worker)], tmp_path / "one"),
        ([*torchrun, "2", str(worker)], tmp_path / "two"),
    ):
        done = subprocess.run(
            [*cmd, str(out), mode], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    one = load_file(tmp_path / "one" / "importance_rank0.safetensors")
    two = [load_file(tmp_path / "two" / f"importance_rank{r}.safetensors") for r in range(2)]
    files = [tmp_path / "one" / "importance_rank0.safetensors"]
    files += [tmp_path / "two" / f"importance_rank{r}.safetensors" for r in range(2)]
    seen = [int(safe_open(f, "pt").metadata()["examples"]) for f in files]
    assert seen == [16, 8, 8]  # each of the 2 ranks passed over its half
    assert one.keys() == two[0].keys() == two[1].keys()
    for k in one:
        assert torch.equal(two[0][k], two[1][k]), k  # every rank holds the same importance
        torch.testing.assert_close(two[0][k], one[k], rtol=1e-4, atol=1e-5)
    assert any(float(v.max()) > 0.5 for v in one.values())  # not a trivial all-zero case
    if mode == "callback":  # the later task trained on 2 ranks: layer 0 (A = 1) never moved
        w = [load_file(tmp_path / "two" / f"weights_rank{r}.safetensors") for r in range(2)]
        names = [k[: -len(".before")] for k in w[0] if k.endswith(".before")]
        protected = [n for n in names if n.startswith("bert.encoder.layer.0.")]
        moved = [n for n in names if not torch.equal(w[0][f"{n}.before"], w[0][f"{n}.after"])]
        assert protected and not set(protected) & set(moved)
        assert any(n.startswith("bert.encoder.layer.1.") for n in moved)
        assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])  # the ranks agree
