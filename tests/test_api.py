"""The public API end to end: plain modules, multi-head, transformers and PEFT models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    classification_batches,
    multi_head,
    same_state,
    snapshot,
    text_batches,
    tiny_bert,
)
from peft import LoraConfig, PeftModel, get_peft_model

import softmask_peft
from softmask_peft import (
    ConfigError,
    CorruptFileError,
    EmptyDataError,
    ImportanceMismatchError,
    MissingFileError,
    NonFiniteGradientError,
    SaveLocationError,
    SoftMaskConfig,
    SoftMaskError,
    SoftMaskModel,
    SoftMaskOptimizer,
    TargetModulesError,
    TaskOrderError,
    UnsupportedFormatError,
    get_softmask_model,
)
from softmask_peft.heads import MultiHeadClassifier


def test_public_names():
    for name in softmask_peft.__all__:
        assert hasattr(softmask_peft, name), name
    assert isinstance(softmask_peft.__version__, str)


@pytest.mark.parametrize(
    "error, builtin",
    [
        (ConfigError, ValueError),
        (TargetModulesError, ConfigError),
        (ImportanceMismatchError, ValueError),
        (UnsupportedFormatError, ValueError),
        (CorruptFileError, ValueError),
        (MissingFileError, FileNotFoundError),
        (SaveLocationError, NotADirectoryError),
        (EmptyDataError, ValueError),
        (NonFiniteGradientError, FloatingPointError),
        (TaskOrderError, RuntimeError),
    ],
)
def test_errors_are_catchable_as_builtins(error, builtin):
    assert issubclass(error, SoftMaskError) and issubclass(error, builtin)


def test_get_softmask_model_wraps_the_given_model():
    net = multi_head()
    model = get_softmask_model(net, SoftMaskConfig())
    assert isinstance(model, SoftMaskModel) and model.base_model is net
    assert isinstance(model.base_model, MultiHeadClassifier)
    assert model.num_tasks == 0 and model.importance == {} and model.head_keep() == 1.0


def test_target_modules_matching_nothing_is_refused_at_wrap_time():
    with pytest.raises(TargetModulesError, match="matches no module"):
        get_softmask_model(tiny_bert(), SoftMaskConfig(target_modules=["q_proj"]))


def test_unknown_method_is_refused():
    with pytest.raises(ConfigError, match="method"):
        get_softmask_model(multi_head(), SoftMaskConfig(method="l2"))


def test_multi_head_two_tasks_protects_important_weights(tmp_path):
    """Task 1 with update masking moves each backbone weight by at most (1 - A) of the plain move."""
    net = multi_head(backbone="mlp")
    model = get_softmask_model(net, SoftMaskConfig(mask_mode="update"))
    data = [classification_batches(n=16, num_classes=3, seed=s) for s in (30, 31)]
    for t in range(2):
        model.begin_task(t, num_classes=3)
        opt = SoftMaskOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), model)
        start = snapshot(net)
        for _ in range(3):
            for x, y in data[t]:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        if t == 1:
            moved = {
                n: (p.detach() - start[n]).abs()
                for n, p in net.named_parameters()
                if n in model.importance
            }
            most = max(moved, key=lambda n: float(model.importance[n].max()))
            a = model.importance[most]
            top = a == a.max()
            assert float(a.max()) > 0.9
            assert float(moved[most][top].max()) < float(moved[most][~top].max())
        model.end_task(data[t])
    assert model.num_tasks == 2 and len(net.heads) == 2
    model.save_pretrained(tmp_path)
    loaded = SoftMaskModel.from_pretrained(multi_head(backbone="mlp", seed=9), tmp_path)
    assert loaded.num_tasks == 2
    assert all(torch.equal(loaded.importance[k], model.importance[k]) for k in model.importance)


def test_bert_with_dict_batches_two_tasks_and_round_trip(tmp_path):
    net = tiny_bert(num_labels=3)
    cfg = SoftMaskConfig(
        target_modules=["query", "key", "value"],
        exclude_modules=["key"],
        head_modules=["classifier"],
    )
    model = get_softmask_model(net, cfg)
    for t in range(2):
        batches = text_batches(n=8, seed=40 + t)
        model.begin_task(t)
        opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
        for b in batches:
            opt.zero_grad()
            model(**b).loss.backward()
            opt.step()
        model.end_task(batches)
    assert sorted(model.importance) == sorted(model.masked_parameter_names)
    assert len(model.importance) == 8 and not any(".key." in k for k in model.importance)
    assert model.config is net.config
    model.save_pretrained(tmp_path)
    fresh = tiny_bert(num_labels=3, seed=8)
    loaded = SoftMaskModel.from_pretrained(fresh, tmp_path)
    assert same_state(snapshot(fresh), snapshot(net))
    assert all(torch.equal(loaded.importance[k], model.importance[k]) for k in model.importance)


def lora_bert(seed: int):
    cfg = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        init_lora_weights=False,
    )
    return get_peft_model(tiny_bert(num_labels=3, seed=seed), cfg)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_peft_lora_model_masks_exactly_the_trainable_lora_params(tmp_path):
    torch.manual_seed(0)
    pm = lora_bert(seed=0)
    assert isinstance(pm, PeftModel)
    model = get_softmask_model(pm, SoftMaskConfig(head_modules=["classifier"], lora_mask="factors"))
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if ".lora_" in n]
    assert len(lora) == 8
    assert model.masked_parameter_names == lora
    assert all("modules_to_save" in n for n in model.head_parameter_names)
    assert sorted(model.masked_parameter_names + model.head_parameter_names) == sorted(trainable)

    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    for t in range(2):
        batches = text_batches(n=8, seed=50 + t)
        model.begin_task(t)
        opt = SoftMaskOptimizer(
            torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), model
        )
        for b in batches:
            opt.zero_grad()
            model(**b).loss.backward()
            opt.step()
        model.end_task(batches)
    assert sorted(model.importance) == sorted(lora)
    params = dict(pm.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())  # base weights untouched

    model.save_pretrained(tmp_path)
    fresh = lora_bert(seed=0)  # the same frozen backbone: only adapters and heads are saved
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.add_(1.0)
    loaded = SoftMaskModel.from_pretrained(fresh, tmp_path)
    assert loaded.masked_parameter_names == lora
    assert same_state(snapshot(fresh), snapshot(pm))
    assert all(torch.equal(loaded.importance[k], model.importance[k]) for k in lora)
    b = text_batches(n=4, seed=99)[0]
    pm.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(**b).logits, pm(**b).logits, rtol=0, atol=0)
