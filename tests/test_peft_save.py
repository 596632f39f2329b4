"""PEFT adapters saved in PEFT's own layout beside the softmask files (real peft, tiny BERT)."""

from __future__ import annotations

import pytest
import torch
from helpers import ENDS_UNTRAINED, text_batches, tiny_bert
from peft import LoraConfig, PeftModel, get_peft_model

from softmask_peft import ConfigError, SoftMaskConfig, SoftMaskModel, get_softmask_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def lora_cfg() -> LoraConfig:
    return LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"]
    )


def train(model: SoftMaskModel, seed: int) -> None:
    """A few SGD steps on the trainable parameters, so the adapters differ from their init."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for b in text_batches(n=8, seed=seed):
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**text_batches(n=4, seed=99)[0]).logits


@ENDS_UNTRAINED
def test_one_adapter_per_task_round_trips_in_peft_layout(tmp_path):
    pm = get_peft_model(tiny_bert(), lora_cfg(), adapter_name="task0")
    pm.add_adapter("task1", lora_cfg())
    model = get_softmask_model(pm, SoftMaskConfig(mask_mode="update"))
    for t in range(2):
        pm.set_adapter(f"task{t}")
        model.begin_task(t)
        train(model, seed=10 + t)
        model.end_task(text_batches(n=8, seed=10 + t))
    model.save_pretrained(tmp_path)
    for name in ("task0", "task1"):
        assert {p.name for p in (tmp_path / name).iterdir()} == {
            "adapter_config.json",
            "adapter_model.safetensors",
        }
    assert not (tmp_path / "model.safetensors").exists()  # the frozen backbone is never written

    fresh = PeftModel.from_pretrained(
        tiny_bert(), tmp_path / "task0", adapter_name="task0", is_trainable=True
    )
    fresh.load_adapter(tmp_path / "task1", adapter_name="task1", is_trainable=True)
    loaded = SoftMaskModel.from_pretrained(fresh, tmp_path)
    assert loaded.num_tasks == 2
    assert sorted(loaded.importance) == sorted(model.importance)
    assert all(torch.equal(loaded.importance[k], model.importance[k]) for k in model.importance)
    assert sorted(loaded.task_importance(0)) == sorted(model.task_importance(0))  # task0's keys
    for t in range(2):
        pm.set_adapter(f"task{t}")
        fresh.set_adapter(f"task{t}")
        torch.testing.assert_close(logits(fresh), logits(pm), rtol=0, atol=0)


@ENDS_UNTRAINED
def test_shared_adapter_round_trips_and_the_adapter_file_is_peft_readable(tmp_path):
    config = SoftMaskConfig(lora_mask="factors")  # element-wise importance of the factors
    model = get_softmask_model(get_peft_model(tiny_bert(), lora_cfg()), config)
    for t in range(2):
        model.begin_task(t)
        train(model, seed=20 + t)
        model.end_task(text_batches(n=8, seed=20 + t))
    model.save_pretrained(tmp_path)
    pm = PeftModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    torch.testing.assert_close(logits(pm), logits(model), rtol=0, atol=0)
    loaded = SoftMaskModel.from_pretrained(pm, tmp_path)
    assert all(torch.equal(loaded.importance[k], model.importance[k]) for k in model.importance)
    adapter = (tmp_path / "adapter_model.safetensors").stat().st_size
    importance = (tmp_path / "softmask_importance.safetensors").stat().st_size
    full = sum(p.numel() * 4 for p in tiny_bert().parameters())
    assert adapter < full / 4  # adapter-only, no backbone
    # float32 importance: accumulated + one per task, for the masked (LoRA) tensors only
    lora_bytes = sum(v.numel() * 4 for v in model.importance.values())
    assert importance < 3 * lora_bytes + 8192  # + the header: task log and config metadata


def test_inference_mode_adapter_and_merged_model_get_clear_errors(tmp_path):
    model = get_softmask_model(get_peft_model(tiny_bert(), lora_cfg()), SoftMaskConfig())
    model.begin_task(0)
    model.end_task(text_batches(n=8, seed=1))
    model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_bert(), tmp_path)  # is_trainable=False
    with pytest.raises(ConfigError, match="is_trainable=True"):
        SoftMaskModel.from_pretrained(frozen, tmp_path)
    merged = PeftModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True).merge_and_unload()
    with pytest.raises(ConfigError, match="not a PeftModel"):
        SoftMaskModel.from_pretrained(merged, tmp_path)
    model.base_model.merge_and_unload()
    with pytest.raises(ConfigError, match="merge_and_unload"):
        model.save_pretrained(tmp_path / "again")
