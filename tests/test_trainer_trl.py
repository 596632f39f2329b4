"""SoftMaskCallback inside the real TRL SFTTrainer (trl 1.16; 1.14.2 on Python 3.10), LoRA on a
tiny causal LM built from a config with a character tokenizer built in-process (no downloads)."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from hf_data import trainer_kwargs
from peft import LoraConfig, PeftModel, get_peft_model
from softmask_bench.char_lm import char_tokenizer, tiny_causal_lm

from softmask_peft import ConfigError, SoftMaskConfig, SoftMaskModel, get_softmask_model
from softmask_peft.integrations.callback import (
    SoftMaskCallback,
    check_trainer_checkpoint,
    latest_complete_checkpoint,
)

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TOK = char_tokenizer()


def lora_lm(seed: int = 0) -> PeftModel:
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(tiny_causal_lm(len(TOK), seed=seed), cfg)


def chat(k: int, n: int = 12) -> Dataset:
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": f"add {i} and {k}"},
                    {"role": "assistant", "content": str(i + k)},
                ]
            }
            for i in range(n)
        ]
    )


def prompt_completion(k: int, n: int = 12) -> Dataset:
    return Dataset.from_list(
        [{"prompt": f"{i} times {k} is ", "completion": str(i * k)} for i in range(n)]
    )


def plain_text(k: int, n: int = 12) -> Dataset:
    return Dataset.from_list([{"text": f"{i} minus {k} is {i - k}."} for i in range(n)])


def sft_args(out, **kw):
    return trl.SFTConfig(**trainer_kwargs(out, **{"max_length": 64, **kw}))


def sft(model, out, data, callbacks=(), **kw):
    return trl.SFTTrainer(
        model=model,
        args=sft_args(out, **kw),
        train_dataset=data,
        processing_class=TOK,
        callbacks=list(callbacks),
    )


def lora_params(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize(("optim", "mode"), [("adamw_torch", "update"), ("sgd", "grad")])
def test_sft_step_is_soft_masked_exactly(tmp_path, optim, mode):
    """After task 0, one SFTTrainer step with the callback moves each LoRA value by (1 - A) times
    what the same step moves it without the callback (AdamW: update masking, SGD: grad masking).
    SPG on the LoRA factors: lora_mask="factors" (the subspace mask: test_lora_subspace.py)."""
    model = lora_lm()
    softmask = get_softmask_model(model, SoftMaskConfig(lora_mask="factors"))
    callback = SoftMaskCallback(softmask)
    sft(model, tmp_path / "t0", chat(0), [callback], optim=optim, assistant_only_loss=True).train()
    assert softmask.num_tasks == 1 and softmask.current_task is None
    importance = {k: v.clone() for k, v in softmask.importance.items()}
    assert set(importance) == set(lora_params(model))
    assert max(float(a.max()) for a in importance.values()) > 0.5  # something is protected

    plain_model = copy.deepcopy(model)
    before = lora_params(model)
    one = dict(optim=optim, max_steps=1, assistant_only_loss=True)
    sft(plain_model, tmp_path / "plain", chat(5), **one).train()
    masked = sft(model, tmp_path / "masked", chat(5), [callback], **one)
    masked.train()
    assert callback.model.num_tasks == 2  # the callback began and ended task 1
    plain, after = lora_params(plain_model), lora_params(model)
    moved = 0
    for name, a in importance.items():
        expected = (plain[name] - before[name]) * (1 - a)
        torch.testing.assert_close(after[name] - before[name], expected, rtol=1e-4, atol=1e-7)
        moved += int((plain[name] != before[name]).sum())
    assert moved > 0


FORMATS = {
    "completion-only": (prompt_completion, dict(packing=False)),  # TRL's default loss
    "completion-packed": (prompt_completion, dict(packing=True)),  # padding-free
    "text-wrapped": (plain_text, dict(packing=True, packing_strategy="wrapped")),
    "chat-checkpointing": (chat, dict(assistant_only_loss=True, gradient_checkpointing=True)),
}
DEFAULT_RUN = {  # the rest: slow (prompt/completion without packing, subspace: test_lora_subspace)
    ("chat-checkpointing", "subspace"),
    ("completion-packed", "subspace"),
    ("completion-only", "factors"),
}


@pytest.mark.parametrize(
    ("make", "kw", "lora_mask"),
    [
        pytest.param(
            *FORMATS[name], mask, id=f"{name}-{mask}",
            marks=() if (name, mask) in DEFAULT_RUN else pytest.mark.slow,
        )
        for name in FORMATS
        for mask in ("subspace", "factors")
    ],
)  # fmt: skip
def test_formats_train_two_tasks_and_write_complete_checkpoints(tmp_path, make, kw, lora_mask):
    model = lora_lm()
    softmask = get_softmask_model(model, SoftMaskConfig(lora_mask=lora_mask))
    callback = SoftMaskCallback(softmask)
    optim = "sgd" if lora_mask == "subspace" else "adamw_torch"
    for t in range(2):
        out = tmp_path / f"task{t}"
        sft(model, out, make(t + 2), [callback], save_strategy="steps", save_steps=1, optim=optim,
            **kw).train()  # fmt: skip
        assert softmask.num_tasks == t + 1
    ckpt = latest_complete_checkpoint(tmp_path / "task1")
    assert ckpt is not None and check_trainer_checkpoint(ckpt) >= 1
    if lora_mask == "factors":
        for a in softmask.importance.values():
            assert torch.isfinite(a).all() and float(a.min()) >= 0 and float(a.max()) <= 1
        assert any(float(a.max()) > 0 for a in softmask.importance.values())
    else:  # the LoRA factors are the subspace mask's: no element-wise importance
        assert softmask.importance == {} and len(softmask.lora_subspace.covariance) == 4
    # the checkpoint (taken during task 1) opens with PEFT, and carries task 0's importance;
    # the subspace mask's folded weights and covariance go onto the same pretrained base
    loaded_peft = PeftModel.from_pretrained(
        tiny_causal_lm(len(TOK), seed=0 if lora_mask == "subspace" else 3), ckpt, is_trainable=True
    )
    loaded = SoftMaskModel.from_pretrained(loaded_peft, ckpt)
    assert loaded.num_tasks == 1 and loaded.current_task == 1
    for k, v in loaded.importance.items():
        torch.testing.assert_close(v, softmask.task_importance(0)[k])
    if lora_mask == "subspace":
        first = loaded.lora_subspace.state_dict()  # task 0's covariance, folded weights
        assert first.keys() == softmask.lora_subspace.state_dict().keys()
        assert any(float(v.abs().max()) > 0 for k, v in first.items() if "covariance" in k)


def test_peft_config_made_by_trl_is_refused(tmp_path):
    """TRL wrapping the model itself (peft_config=...) trains a model the callback does not hold."""
    base = tiny_causal_lm(len(TOK))
    softmask = get_softmask_model(lora_lm(), SoftMaskConfig())
    trainer = trl.SFTTrainer(
        model=base,
        args=sft_args(tmp_path),
        train_dataset=chat(0),
        processing_class=TOK,
        peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"),
        callbacks=[SoftMaskCallback(softmask)],
    )
    with pytest.raises(ConfigError, match="not the model this SoftMaskCallback wraps"):
        trainer.train()
