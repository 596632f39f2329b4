"""The merge workflow: a merged folder for serving while adapter + importance keep learning."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from softmask_bench.char_lm import char_tokenizer, tiny_causal_lm
from transformers import AutoModelForCausalLM

from softmask_peft import (
    ConfigError,
    SoftMaskConfig,
    SoftMaskModel,
    SoftMaskOptimizer,
    get_softmask_model,
)
from softmask_peft.merge import save_merged

TOK = char_tokenizer()


def lm_batch(text: str) -> dict[str, torch.Tensor]:
    ids = TOK([text], return_tensors="pt").input_ids
    return {"input_ids": ids, "labels": ids}


def learn_and_save(softmask, peft, tmp_path) -> None:
    """Task 0 (three SGD steps on one batch), then the continual folder and the merged one."""
    softmask.begin_task(0)
    opt = SoftMaskOptimizer(torch.optim.SGD(peft.parameters(), lr=0.5), softmask)
    for _ in range(3):
        softmask(**lm_batch("copy: abc => abc")).loss.backward()
        opt.step()
        opt.zero_grad()
    softmask.end_task([lm_batch("copy: abc => abc")])
    softmask.save_pretrained(tmp_path / "continual")
    save_merged(softmask, tmp_path / "serve")


def test_merged_folder_serves_and_the_adapter_keeps_learning(tmp_path):
    """SPG on the LoRA factors: the adapter carries what was learned, onto any base."""
    peft = get_peft_model(
        tiny_causal_lm(len(TOK)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    softmask = get_softmask_model(peft, SoftMaskConfig(lora_mask="factors"))
    learn_and_save(softmask, peft, tmp_path)

    served = AutoModelForCausalLM.from_pretrained(tmp_path / "serve").eval()
    assert not any("lora" in n for n, _ in served.named_parameters())
    ids = lm_batch("reverse: xyz => zyx")["input_ids"]
    peft.eval()
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, peft(input_ids=ids).logits)
        with peft.disable_adapter():  # the adapter changed the model: the merge carries it
            without = peft(input_ids=ids).logits
        assert float((served(input_ids=ids).logits - without).abs().max()) > 1e-4

    # the continual line goes on from the adapter + importance, in this process or from files
    softmask.begin_task(1)
    assert softmask.keep_masks is not None and softmask.num_tasks == 1
    base = tiny_causal_lm(len(TOK), seed=5)
    again = SoftMaskModel.from_pretrained(
        PeftModel.from_pretrained(base, tmp_path / "continual", is_trainable=True),
        tmp_path / "continual",
    )
    assert again.num_tasks == 1
    for k, v in softmask.importance.items():
        torch.testing.assert_close(again.importance[k], v)


def test_save_merged_needs_a_peft_model(tmp_path):
    with pytest.raises(ConfigError, match="merges PEFT adapters"):
        save_merged(get_softmask_model(tiny_causal_lm(len(TOK)), SoftMaskConfig()), tmp_path)


def test_the_subspace_mask_merges_and_continues_from_the_folded_weights(tmp_path):
    """The default LoRA mask folds the adapter at a task's end: the merged folder serves what
    was learned, and the continual folder (adapter + folded weights + covariances) onto the
    same pretrained base continues from it."""
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    peft = get_peft_model(tiny_causal_lm(len(TOK)), lora)
    softmask = get_softmask_model(peft, SoftMaskConfig())
    learn_and_save(softmask, peft, tmp_path)

    ids = lm_batch("reverse: xyz => zyx")["input_ids"]
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "serve").eval()
    pretrained = tiny_causal_lm(len(TOK)).eval()
    peft.eval()
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, peft(input_ids=ids).logits)
        assert float((served(input_ids=ids).logits - pretrained(input_ids=ids).logits).abs().max()) > 1e-4
        again = SoftMaskModel.from_pretrained(
            PeftModel.from_pretrained(tiny_causal_lm(len(TOK)), tmp_path / "continual", is_trainable=True),
            tmp_path / "continual",
        ).eval()
        torch.testing.assert_close(again(input_ids=ids).logits, peft(input_ids=ids).logits)
    assert again.num_tasks == 1 and again.lora_subspace.keep.keys() == softmask.lora_subspace.keep.keys()
