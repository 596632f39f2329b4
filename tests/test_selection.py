"""Parameter selection with PEFT's module matcher: targets, excludes, heads."""

from __future__ import annotations

import pytest
from helpers import multi_head, small_mlp, tiny_bert
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from softmask_peft import SoftMaskConfig, TargetModulesError
from softmask_peft.selection import matching_modules, select_parameters

BERT_LAYERS = (0, 1)


def bert_names(kinds, params=("weight", "bias")):
    return [
        f"bert.encoder.layer.{i}.attention.self.{k}.{p}"
        for i in BERT_LAYERS
        for k in kinds
        for p in params
    ]


def test_default_masks_every_trainable_parameter_outside_heads():
    net = small_mlp()
    masked, heads = select_parameters(net, SoftMaskConfig())
    assert masked == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert heads == []


def test_frozen_parameters_are_not_selected():
    net = small_mlp()
    net.fc1.bias.requires_grad_(False)
    masked, _ = select_parameters(net, SoftMaskConfig())
    assert "fc1.bias" not in masked and "fc1.weight" in masked


def test_multi_head_heads_are_separated():
    net = multi_head()
    net.add_head(2)
    net.add_head(3)
    masked, heads = select_parameters(net, SoftMaskConfig(head_modules=["heads"]))
    assert masked == ["backbone.weight", "backbone.bias"]
    assert heads == ["heads.0.weight", "heads.0.bias", "heads.1.weight", "heads.1.bias"]


def test_bert_target_list_matches_exactly_query_and_value_of_every_layer():
    net = tiny_bert()
    cfg = SoftMaskConfig(target_modules=["query", "value"], head_modules=["classifier"])
    masked, heads = select_parameters(net, cfg)
    assert sorted(masked) == sorted(bert_names(["query", "value"]))
    assert heads == ["classifier.weight", "classifier.bias"]


def test_bert_regex_string_is_a_full_match():
    net = tiny_bert()
    cfg = SoftMaskConfig(target_modules=r".*layer\.1\.attention\.self\.(query|key)")
    masked, _ = select_parameters(net, cfg)
    assert sorted(masked) == sorted(
        f"bert.encoder.layer.1.attention.self.{k}.{p}"
        for k in ("query", "key")
        for p in ("weight", "bias")
    )
    # full match: "query" alone as a regex matches no module name
    with pytest.raises(TargetModulesError):
        select_parameters(net, SoftMaskConfig(target_modules="query"))


def test_bert_exclude_modules_removes():
    net = tiny_bert()
    cfg = SoftMaskConfig(
        target_modules=["query", "key", "value"],
        exclude_modules=["key"],
        head_modules=["classifier"],
    )
    masked, _ = select_parameters(net, cfg)
    assert sorted(masked) == sorted(bert_names(["query", "value"]))


def test_default_on_bert_with_heads_masks_everything_else():
    net = tiny_bert()
    masked, heads = select_parameters(net, SoftMaskConfig(head_modules=["classifier"]))
    expected = [n for n, _ in net.named_parameters() if not n.startswith("classifier.")]
    assert masked == expected and len(heads) == 2


def test_matching_modules_follows_peft_suffix_rule():
    net = nn.Module()
    net.query = nn.Linear(2, 2)
    net.query_proj = nn.Linear(2, 2)
    net.block = nn.Module()
    net.block.query = nn.Linear(2, 2)
    got = matching_modules(net, ["query"])
    assert got == {"query", "block.query"}
    # the same answer as PEFT's own matcher, module by module
    from types import SimpleNamespace

    spec = SimpleNamespace(target_modules=["query"], exclude_modules=None, target_parameters=None)
    assert got == {n for n, _ in net.named_modules() if n and check_target_module_exists(spec, n)}


def test_target_matching_nothing_names_the_pattern_and_shows_module_names():
    with pytest.raises(
        TargetModulesError, match=r"target_modules=\['attn'\] matches no module.*fc1"
    ):
        select_parameters(small_mlp(), SoftMaskConfig(target_modules=["attn"]))


def test_head_modules_matching_nothing():
    with pytest.raises(TargetModulesError, match="head_modules"):
        select_parameters(small_mlp(), SoftMaskConfig(head_modules=["classifier"]))


def test_excluding_everything_leaves_nothing_to_mask():
    with pytest.raises(TargetModulesError, match="no trainable parameter is left"):
        select_parameters(small_mlp(), SoftMaskConfig(exclude_modules=["fc1", "fc2"]))
