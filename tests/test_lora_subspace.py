"""The LoRA subspace mask (lora_subspace.py), the default protection of a LoRA PeftModel: the keep
matrix in closed form, which models get it, the masked step on A and the fold, the checkpoint
file, refusals, and real SFTTrainer runs with checkpoints and resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from softmask_peft import (
    ConfigError,
    SoftMaskConfig,
    SoftMaskModel,
    SoftMaskOptimizer,
    get_softmask_model,
)
from softmask_peft.errors import (
    CorruptFileError,
    ImportanceMismatchError,
    InputTypeError,
    MissingFileError,
    TaskOrderError,
)
from softmask_peft.lora_subspace import subspace_keep

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
LIN = "base_model.model.lin"
SUBSPACE = "lora_subspace.safetensors"


class Net(nn.Module):
    """One Linear fed with the batch's `input_ids` as features (float), so inputs are exact."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, input_ids: torch.Tensor, **kw: object) -> torch.Tensor:
        return self.lin(input_ids)


def lora_net(seed: int = 0, **lora):
    torch.manual_seed(seed)
    return get_peft_model(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], **lora))


def layer_of(model: SoftMaskModel):
    return model.base_model.base_model.model.lin


def test_keep_closed_form():
    """C = diag(1, 3, 0, 0): Σλ = 4, a = tanh(λ / 4s) per axis; C = 2 v vᵀ (|v| = 1):
    Σλ = 2, K = I − tanh(1 / s) v vᵀ, the same in any width d."""
    c = torch.diag(torch.tensor([1.0, 3.0, 0.0, 0.0]))
    a = [math.tanh(1 / 2), math.tanh(3 / 2)]  # s = 0.5
    expected = torch.diag(torch.tensor([1 - a[0], 1 - a[1], 1.0, 1.0]))
    assert torch.allclose(subspace_keep(c, 0.5), expected, atol=1e-6)
    for d in (4, 64):
        v = torch.zeros(d)
        v[:3] = torch.tensor([1.0, 2.0, 2.0]) / 3
        k = subspace_keep(2 * torch.outer(v, v), 0.25)
        assert torch.allclose(k, torch.eye(d) - math.tanh(4.0) * torch.outer(v, v), atol=1e-6)
    assert torch.equal(subspace_keep(torch.zeros(4, 4), 1.0), torch.eye(4))


def test_which_models_get_the_subspace_mask():
    """The default for a one-adapter LoRA PeftModel with SPG; its factors leave the element-wise
    importance (but stay listed as masked); "factors", two adapters, a plain model: none."""
    model = get_softmask_model(lora_net(), SoftMaskConfig())
    assert model.lora_subspace is not None and list(model.lora_subspace.layers) == [LIN]
    factors = {f"{LIN}.lora_A.default.weight", f"{LIN}.lora_B.default.weight"}
    assert set(model.masked_parameter_names) == factors and model.method.masked == []
    factor_model = get_softmask_model(lora_net(), SoftMaskConfig(lora_mask="factors"))
    assert factor_model.lora_subspace is None
    assert set(factor_model.method.masked) == factors
    two = lora_net()
    two.add_adapter("other", LoraConfig(r=2, target_modules=["lin"]))
    assert get_softmask_model(two, SoftMaskConfig()).lora_subspace is None
    assert get_softmask_model(Net(), SoftMaskConfig()).lora_subspace is None
    for bad in ({"lora_mask": "rows"}, {"lora_subspace_scale": 0}, {"lora_subspace_scale": True}):
        with pytest.raises(ConfigError, match="lora_"):
            SoftMaskConfig(**bad)
    with pytest.raises(ConfigError, match="init_lora_weights"):
        get_softmask_model(lora_net(init_lora_weights=False), SoftMaskConfig())
    with pytest.raises(ConfigError, match="DoRA"):
        get_softmask_model(lora_net(use_dora=True), SoftMaskConfig())


def test_the_fold_keeps_the_function_and_the_sgd_step_on_a_is_masked():
    model = get_softmask_model(lora_net(), SoftMaskConfig(lora_subspace_scale=0.25))
    layer = layer_of(model)
    x = torch.randn(5, 4)
    model.begin_task(0)
    with torch.no_grad():  # a trained adapter: B != 0
        layer.lora_B["default"].weight.normal_()
    before = model(input_ids=x).detach()
    w = layer.base_layer.weight.detach().clone()
    delta = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight  # α/r = 2
    # task 0's inputs lie on e0: C = diag(9, 0, 0, 0) -> keep = diag(1 - tanh(9 / (0.25 · 9)), 1, 1, 1)
    model.end_task([{"input_ids": torch.tensor([[3.0, 0, 0, 0]])}])
    assert torch.allclose(model(input_ids=x), before, atol=1e-5)
    assert torch.allclose(layer.base_layer.weight, w + delta.detach(), atol=1e-6)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    model.begin_task(1)
    a0 = layer.lora_A["default"].weight.detach().clone()
    a_param = layer.lora_A["default"].weight
    opt = SoftMaskOptimizer(torch.optim.SGD([a_param, layer.lora_B["default"].weight], lr=0.1), model)
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(1.0)  # so that A gets a gradient
    model(input_ids=x).pow(2).sum().backward()
    raw = -0.1 * a_param.grad.clone()
    opt.step()
    change = a_param.detach() - a0
    assert torch.allclose(change[:, 0], (1 - math.tanh(4.0)) * raw[:, 0], atol=1e-6)
    assert torch.allclose(change[:, 1:], raw[:, 1:], atol=1e-6)
    assert model.keep_masks.masked_steps == 1


def test_only_sgd_trains_a_subspace_masked_model_and_no_device_exports_it():
    model = get_softmask_model(lora_net(), SoftMaskConfig())
    with pytest.raises(ConfigError, match="needs torch.optim.SGD, got AdamW"):
        SoftMaskOptimizer(torch.optim.AdamW(model.parameters()), model)
    from softmask_peft.device import export_for_device

    with pytest.raises(ConfigError, match="no device learner"):
        export_for_device(model, torch.randn(2, 4), "unused")
    factors = get_softmask_model(lora_net(), SoftMaskConfig(lora_mask="factors"))
    SoftMaskOptimizer(torch.optim.AdamW(factors.parameters()), factors)


@pytest.mark.parametrize("batch", [(torch.randn(2, 4),), {"labels": torch.zeros(2)}])
def test_a_batch_without_input_ids_is_refused_before_anything_changes(batch):
    model = get_softmask_model(lora_net(), SoftMaskConfig())
    model.begin_task(0)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(InputTypeError, match="input_ids"):
        model.end_task([batch])
    assert model.lora_subspace.covariance == {} and model.current_task == 0
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def trained(seed: int = 0) -> SoftMaskModel:
    """A model after one task whose adapter had learned something (B != 0): folded weights."""
    model = get_softmask_model(lora_net(seed), SoftMaskConfig())
    model.begin_task(0)
    with torch.no_grad():
        layer_of(model).lora_B["default"].weight.normal_()
    model.end_task([{"input_ids": torch.randn(6, 4)}])
    return model


def test_save_and_load_restore_the_folded_model(tmp_path):
    """save_pretrained writes the covariances and folded weights beside the adapter; a fresh
    model (pretrained base + the same LoraConfig) loads into the folded model. Files of another
    model or save are refused before anything changes."""
    model = trained()
    model.save_pretrained(tmp_path / "run")
    state = load_file(tmp_path / "run" / SUBSPACE)
    assert set(state) == {f"{LIN}.covariance", f"{LIN}.base_weight"}
    assert torch.equal(state[f"{LIN}.base_weight"], layer_of(model).base_layer.weight)
    config = json.loads((tmp_path / "run" / "softmask_config.json").read_text())
    assert config["format_version"] == 5 and config["lora_mask"] == "subspace"

    x = torch.randn(5, 4)
    fresh = lora_net(0)
    with torch.no_grad():  # the adapter as saved (PEFT's own loading does this)
        for name in ("lora_A", "lora_B"):
            getattr(fresh.base_model.model.lin, name)["default"].weight.copy_(
                getattr(layer_of(model), name)["default"].weight
            )
    assert not torch.allclose(fresh(input_ids=x), model(input_ids=x))
    loaded = SoftMaskModel.from_pretrained(fresh, tmp_path / "run")
    assert torch.equal(loaded(input_ids=x), model(input_ids=x))
    assert torch.equal(loaded.lora_subspace.keep[LIN], model.lora_subspace.keep[LIN])
    assert loaded.num_tasks == 1 and loaded.importance == {}

    def refused(folder, error, match):
        other = lora_net(3)
        before = {n: p.detach().clone() for n, p in other.state_dict().items()}
        with pytest.raises(error, match=match):
            SoftMaskModel.from_pretrained(other, folder)
        assert all(torch.equal(v, before[n]) for n, v in other.state_dict().items())

    meta = {"format_version": "5", "save_id": _save_id(tmp_path / "run")}
    cases = {
        "shape": ({**state, f"{LIN}.base_weight": torch.zeros(3, 5)}, meta, ImportanceMismatchError, "does not fit"),
        "dtype": ({**state, f"{LIN}.covariance": state[f"{LIN}.covariance"].double()}, meta, ImportanceMismatchError, "does not fit"),
        "nan": ({**state, f"{LIN}.base_weight": torch.full((3, 4), float("nan"))}, meta, ImportanceMismatchError, "not finite"),
        "other save": (state, {**meta, "save_id": "0" * 32}, CorruptFileError, "different saves"),
    }  # fmt: skip
    for name, (tensors, metadata, error, match) in cases.items():
        folder = tmp_path / name
        shutil.copytree(tmp_path / "run", folder)
        save_file(tensors, str(folder / SUBSPACE), metadata=metadata)
        refused(folder, error, match)
    shutil.copytree(tmp_path / "run", tmp_path / "cut")
    raw = (tmp_path / "run" / SUBSPACE).read_bytes()
    (tmp_path / "cut" / SUBSPACE).write_bytes(raw[: len(raw) // 2])
    refused(tmp_path / "cut", CorruptFileError, "")
    (tmp_path / "cut" / SUBSPACE).unlink()
    refused(tmp_path / "cut", MissingFileError, SUBSPACE)


def _save_id(folder) -> str:
    from softmask_peft.weights import open_safetensors

    with open_safetensors(folder / SUBSPACE) as f:
        return f.header.metadata["save_id"]


def test_a_lora_checkpoint_of_format_4_loads_with_factor_masks():
    """tests/fixtures/v0_2_0/lora_bert, written before lora_mask existed: SPG on the factors."""
    from pathlib import Path

    from helpers import tiny_bert

    folder = Path(__file__).parent / "fixtures" / "v0_2_0" / "lora_bert"
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(tiny_bert(seed=0), folder, is_trainable=True)
    model = SoftMaskModel.from_pretrained(peft_model, folder)
    assert model.softmask_config.lora_mask == "factors" and model.lora_subspace is None
    assert model.num_tasks == 2 and [t.name for t in model.task_log] == ["domain_0", "domain_1"]
    saved = load_file(folder / "softmask_importance.safetensors")
    assert model.importance.keys() == {k for k in saved if not k.startswith("task.")}
    assert all(torch.equal(a, saved[k]) for k, a in model.importance.items())
    assert any("lora_A" in k for k in model.importance)


def test_sft_trainer_folds_checkpoints_and_resumes(tmp_path):
    """Two tasks through the real SFTTrainer (SGD) and SoftMaskCallback with the default config:
    each train() ends with the fold (B = 0) and the covariance of the task's tokens; every
    checkpoint carries lora_subspace.safetensors; a new process (pretrained base, same
    LoraConfig) that loads a checkpoint of task 1 and resumes ends where the uninterrupted run
    ended. AdamW and a model that lacks the checkpoint's state are refused."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from hf_data import trainer_kwargs
    from softmask_bench.char_lm import char_tokenizer, tiny_causal_lm

    from softmask_peft.integrations.callback import SoftMaskCallback

    tok = char_tokenizer()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")

    def build():
        torch.manual_seed(0)
        return get_peft_model(tiny_causal_lm(len(tok)), cfg)

    def train(model, softmask, k, resume=None, **kw):
        data = Dataset.from_list(
            [{"prompt": f"{i} times {k} is ", "completion": str(i * k)} for i in range(8)]
        )
        args = trl.SFTConfig(**trainer_kwargs(tmp_path / str(k), max_length=64, **kw))
        trl.SFTTrainer(
            model=model, args=args, train_dataset=data, processing_class=tok,
            callbacks=[SoftMaskCallback(softmask)],
        ).train(resume_from_checkpoint=resume)  # fmt: skip

    model = build()
    softmask = get_softmask_model(model, SoftMaskConfig())
    with pytest.raises(ConfigError, match="needs torch.optim.SGD"):
        train(model, softmask, 2)  # TRL's default optimizer: AdamW
    softmask = get_softmask_model(model, SoftMaskConfig())  # the refused run began no task
    train(model, softmask, 2, optim="sgd")
    train(model, softmask, 3, optim="sgd", num_train_epochs=2, save_strategy="steps", save_steps=2)
    assert softmask.num_tasks == 2
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert len(softmask.lora_subspace.covariance) == 4  # q and v of 2 layers
    for keep in softmask.lora_subspace.keep.values():  # both tasks protect some directions
        protection = torch.linalg.eigvalsh(torch.eye(len(keep)) - keep)  # the a_k
        assert float(protection.min()) > -1e-5 and 0.5 < float(protection.max()) < 1 + 1e-5
    checkpoint = tmp_path / "3" / "checkpoint-2"
    assert (checkpoint / SUBSPACE).is_file()
    final = {n: p.detach().clone() for n, p in model.named_parameters()}

    unloaded = build()  # a new process that forgot to load the checkpoint
    with pytest.raises(TaskOrderError):
        train(unloaded, get_softmask_model(unloaded, SoftMaskConfig()), 3, resume=str(checkpoint),
              optim="sgd", num_train_epochs=2)  # fmt: skip

    from peft import PeftModel

    again = PeftModel.from_pretrained(
        build().base_model.model, checkpoint, is_trainable=True
    )  # pretrained base + the checkpoint's adapter
    resumed = SoftMaskModel.from_pretrained(again, checkpoint)
    assert resumed.current_task == 1
    train(again, resumed, 3, resume=str(checkpoint), optim="sgd", num_train_epochs=2)
    for n, p in again.named_parameters():
        assert torch.allclose(p, final[n], atol=1e-6), n
    mine, theirs = resumed.lora_subspace.covariance, softmask.lora_subspace.covariance
    assert mine.keys() == theirs.keys()
    assert all(torch.allclose(mine[n], c, atol=1e-6) for n, c in theirs.items())
