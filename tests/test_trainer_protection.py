"""Never silently unprotected, and DAS's loss where Trainer computes it (real transformers Trainer,
tiny random models, CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import tiny_bert, tiny_llama
from hf_data import examples, trainer_kwargs
from transformers import Trainer, TrainingArguments

from softmask_peft import ConfigError, SoftMaskConfig, get_softmask_model
from softmask_peft.integrations.callback import SoftMaskCallback
from softmask_peft.integrations.trainer import SoftMaskTrainer
from softmask_peft.testing import seed_importance

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def args(out, **kw) -> TrainingArguments:
    return TrainingArguments(**trainer_kwargs(out, **kw))


def lm_examples(n: int = 8, seq_len: int = 8, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, seq_len), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(seq_len, dtype=torch.long), "labels": ids[i]}
        for i in range(n)
    ]


def batch_of(items):
    return {k: torch.stack([torch.as_tensor(e[k]) for e in items]) for k in ("input_ids", "labels")}


def test_plain_trainer_on_a_later_task_warns_and_the_callback_does_not(tmp_path):
    bert = tiny_bert()
    softmask = get_softmask_model(bert, SoftMaskConfig())
    callback = SoftMaskCallback(softmask)
    Trainer(bert, args(tmp_path / "t0"), train_dataset=examples(8), callbacks=[callback]).train()
    assert softmask.num_tasks == 1

    softmask.begin_task(1)  # task 1 trained by a plain Trainer: nothing masks its steps
    Trainer(bert, args(tmp_path / "t1"), train_dataset=examples(8, seed=3)).train()
    with pytest.warns(RuntimeWarning, match="task 1 ended without a single soft-masked"):
        softmask.end_task([batch_of(examples(4))])

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        Trainer(
            bert, args(tmp_path / "t2"), train_dataset=examples(8, seed=4), callbacks=[callback]
        ).train()
    assert softmask.num_tasks == 3


def das_llama():
    return get_softmask_model(tiny_llama(), SoftMaskConfig(method="das", mask_mode="update"))


def test_das_contrastive_term_is_in_the_trainer_loss_with_gradient_checkpointing(tmp_path):
    softmask = das_llama()
    assert softmask.method.adds_loss_term()
    trainer = SoftMaskTrainer(
        softmask,
        args(tmp_path, gradient_checkpointing=True, remove_unused_columns=False),
        train_dataset=lm_examples(),
    )
    for t in range(2):
        trainer.train_dataset = lm_examples(seed=t)
        trainer.begin_task(t)
        trainer.train()
        trainer.end_task()  # importance pass with checkpointing on in the model
    assert softmask.num_tasks == 2
    assert all(float(v.max()) > 0 for v in softmask.importance.values())
    batch = next(iter(trainer.get_train_dataloader()))
    softmask.begin_task(2)
    torch.manual_seed(0)
    from_trainer = trainer.compute_loss(softmask, dict(batch))
    torch.manual_seed(0)
    expected = softmask.training_loss(dict(batch))
    plain = softmask(**batch).loss
    torch.testing.assert_close(from_trainer, expected)
    assert float(from_trainer - plain) > 1e-4  # the contrastive term is there


def test_callback_refuses_a_trainer_loss_without_das_term(tmp_path):
    softmask = das_llama()
    trainer = Trainer(
        softmask.base_model,
        args(tmp_path),
        train_dataset=lm_examples(),
        callbacks=[SoftMaskCallback(softmask)],
    )
    with pytest.raises(ConfigError, match="contrastive"):
        trainer.train()


@pytest.mark.parametrize("where", ["autocast", "weights"])
def test_callback_protects_and_measures_under_bf16(tmp_path, where):
    """bf16 as LLM users train: Trainer's bf16 autocast, or the weights themselves in bf16.
    Values with A = 1 (all of layer 1) stay bit-identical through the later task's masked steps; the
    importance pass gives finite values in [0, 1], stored in float32."""
    torch.manual_seed(0)
    bert = tiny_bert(dropout=0.0)
    if where == "weights":
        bert = bert.to(torch.bfloat16)
    softmask = get_softmask_model(bert, SoftMaskConfig(head_modules=["classifier"]))
    callback = SoftMaskCallback(softmask)
    kw = {"bf16": where == "autocast", "optim": "sgd", "learning_rate": 0.5}
    Trainer(bert, args(tmp_path / "t0", **kw), train_dataset=examples(8), callbacks=[callback]).train()
    a = softmask.task_importance(0)
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in a.values())
    assert all(float(v.min()) >= 0 and float(v.max()) <= 1 for v in a.values())
    assert max(float(v.max()) for v in a.values()) > 0.5
    params = dict(bert.named_parameters())
    protected = [n for n in softmask.masked_parameter_names if n.startswith("bert.encoder.layer.1.")]
    seed_importance(
        softmask,
        {n: torch.full(params[n].shape, float(n in protected)) for n in softmask.masked_parameter_names},
    )
    before = {n: p.detach().clone() for n, p in params.items()}
    Trainer(bert, args(tmp_path / "t2", **kw), train_dataset=examples(8, seed=3), callbacks=[callback]).train()
    moved = [n for n in softmask.masked_parameter_names if not torch.equal(params[n], before[n])]
    assert protected and not set(protected) & set(moved)
    assert len(moved) > len(params) // 4  # the unprotected ones learned
