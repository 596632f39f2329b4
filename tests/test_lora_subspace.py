"""LoRASubspaceCallback: the soft input-subspace keep matrix in closed form, the masked step on A,
the fold (function unchanged, W + (α/r)·B·A), persistence, refusals, and a real SFTTrainer run."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from softmask_peft import ConfigError
from softmask_peft.errors import ImportanceMismatchError, InputTypeError
from softmask_peft.integrations.lora_subspace import LoRASubspaceCallback, subspace_keep

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


class Net(nn.Module):
    """One Linear fed with the batch's `input_ids` as features (float), so inputs are exact."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, input_ids: torch.Tensor, **kw: object) -> torch.Tensor:
        return self.lin(input_ids)


def lora_net(seed: int = 0):
    torch.manual_seed(seed)
    return get_peft_model(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=["lin"]))


def test_keep_closed_form():
    """C = diag(0, 4, 0, 0): mean λ = 1, a = tanh(4 / s) on e1 only; C = v vᵀ (|v| = 1, d = 4):
    mean λ = 1/4, K = I − tanh(4 / s) v vᵀ."""
    c = torch.diag(torch.tensor([0.0, 4.0, 0.0, 0.0]))
    expected = torch.diag(torch.tensor([1.0, 1 - math.tanh(4 / 0.5), 1.0, 1.0]))
    assert torch.allclose(subspace_keep(c, 0.5), expected, atol=1e-6)
    v = torch.tensor([1.0, 2.0, 2.0, 0.0]) / 3
    k = subspace_keep(torch.outer(v, v), 1.0)
    assert torch.allclose(k, torch.eye(4) - math.tanh(4.0) * torch.outer(v, v), atol=1e-6)
    assert torch.equal(subspace_keep(torch.zeros(4, 4), 1.0), torch.eye(4))


def test_fold_keeps_the_function_and_the_step_on_a_is_masked():
    model = lora_net()
    cb = LoRASubspaceCallback(model, scale=1.0)
    layer = model.base_model.model.lin
    with torch.no_grad():  # a trained adapter: B != 0
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(5, 4)
    before = model(input_ids=x).detach()
    w = layer.base_layer.weight.detach().clone()
    delta = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight  # α/r = 2
    # task 0's inputs lie on e0: C = diag(9, 0, 0, 0) -> keep = diag(1 - tanh(4), 1, 1, 1)
    cb.end_task([{"input_ids": torch.tensor([[3.0, 0, 0, 0]])}])
    assert torch.allclose(model(input_ids=x), before, atol=1e-5)
    assert torch.allclose(layer.base_layer.weight, w + delta.detach(), atol=1e-6)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    a0 = layer.lora_A["default"].weight.detach().clone()
    # one SGD step on A, with and without the callback around it
    opt = torch.optim.SGD([layer.lora_A["default"].weight, layer.lora_B["default"].weight], lr=0.1)
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(1.0)  # so that A gets a gradient
    model(input_ids=x).pow(2).sum().backward()
    raw = -0.1 * layer.lora_A["default"].weight.grad.clone()
    cb.on_pre_optimizer_step(None, None, None)
    opt.step()
    cb.on_optimizer_step(None, None, None)
    change = layer.lora_A["default"].weight.detach() - a0
    assert torch.allclose(change[:, 0], (1 - math.tanh(4.0)) * raw[:, 0], atol=1e-6)
    assert torch.allclose(change[:, 1:], raw[:, 1:], atol=1e-6)


def test_state_round_trip_and_refusals():
    model = lora_net()
    cb = LoRASubspaceCallback(model)
    cb.end_task([{"input_ids": torch.randn(6, 4)}])
    state = cb.state_dict()
    assert set(state) == {"base_model.model.lin.covariance"}
    other = LoRASubspaceCallback(lora_net(1))
    other.load_state_dict(state)
    assert torch.equal(other.keep["base_model.model.lin"], cb.keep["base_model.model.lin"])
    a = other.model.base_model.model.lin.lora_A["default"].weight
    with pytest.warns(UserWarning, match="optim='sgd'"):  # Adam undoes the mask (module doc)
        other.on_train_begin(None, None, None, optimizer=torch.optim.AdamW([a]))
    with pytest.raises(ConfigError, match="not the PeftModel"):
        other.on_train_begin(None, None, None, model=Net())
    with pytest.raises(ImportanceMismatchError, match="expected a float"):
        other.load_state_dict({"base_model.model.lin.covariance": torch.zeros(3, 3)})
    with pytest.raises(ImportanceMismatchError, match="missing"):
        other.load_state_dict({})
    with pytest.raises(InputTypeError, match="PeftModel"):
        LoRASubspaceCallback(Net())
    with pytest.raises(ConfigError, match="scale"):
        LoRASubspaceCallback(lora_net(), scale=0)
    with pytest.raises(ConfigError, match="init_lora_weights"):
        torch.manual_seed(0)
        LoRASubspaceCallback(
            get_peft_model(Net(), LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
        )


@pytest.mark.slow  # ~5 s: two SFTTrainer runs
@pytest.mark.parametrize("batch", [(torch.randn(2, 4),), {"labels": torch.zeros(2)}])
def test_a_batch_without_input_ids_is_refused_before_anything_changes(batch):
    model = lora_net()
    cb = LoRASubspaceCallback(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(InputTypeError, match="input_ids"):
        cb.end_task([batch])
    assert cb.covariance == {} and cb.keep == {}
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_sft_trainer_folds_after_each_task(tmp_path):
    """Two tasks through the real SFTTrainer (SGD): each train() ends with the fold (B = 0) and the
    covariance of the task's tokens."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from hf_data import trainer_kwargs
    from softmask_bench.char_lm import char_tokenizer, tiny_causal_lm

    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(tiny_causal_lm(len(tok)), cfg)
    cb = LoRASubspaceCallback(model)
    for k in (2, 3):
        data = Dataset.from_list(
            [{"prompt": f"{i} times {k} is ", "completion": str(i * k)} for i in range(8)]
        )
        args = trl.SFTConfig(**trainer_kwargs(tmp_path / str(k), max_length=64, optim="sgd"))
        trl.SFTTrainer(
            model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[cb]
        ).train()
        assert all(
            torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if "lora_B" in n
        )
    assert len(cb.covariance) == 4  # q and v of 2 layers
    for keep in cb.keep.values():  # both tasks' tokens protect some directions
        protection = torch.linalg.eigvalsh(torch.eye(len(keep)) - keep)  # the a_k
        assert float(protection.min()) > -1e-5 and 0.5 < float(protection.max()) < 1 + 1e-5


def test_one_model_is_protected_by_one_kind_of_mask():
    """SoftMaskModel (element-wise masks on the factors) and LoRASubspaceCallback (folds and
    rewrites A) on one PeftModel: the second is refused, whichever comes first; the same kind
    twice is fine (a reload onto the same model)."""
    from softmask_peft import SoftMaskConfig, get_softmask_model

    model = lora_net()
    LoRASubspaceCallback(model)
    with pytest.raises(ConfigError, match="already protected by a LoRASubspaceCallback"):
        get_softmask_model(model, SoftMaskConfig())
    LoRASubspaceCallback(model)
    other = lora_net(1)
    get_softmask_model(other, SoftMaskConfig())
    with pytest.raises(ConfigError, match="already protected by a SoftMaskModel"):
        LoRASubspaceCallback(other)
    get_softmask_model(other, SoftMaskConfig())
    fresh = lora_net(2)
    with pytest.raises(ConfigError, match="scale"):
        LoRASubspaceCallback(fresh, scale=-1)
    get_softmask_model(fresh, SoftMaskConfig())  # a refused callback left no mark
