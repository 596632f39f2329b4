"""SoftMaskConfig: validation, dict/JSON round trip, clear errors on bad input."""

from __future__ import annotations

import json

import pytest
from helpers import multi_head
from softmask_format.names import CONFIG_NAME, FORMAT_VERSION

from softmask_peft import (
    ConfigError,
    CorruptFileError,
    DASConfig,
    MissingFileError,
    SoftMaskConfig,
    SPGConfig,
    UnsupportedFormatError,
    get_softmask_model,
)


def test_defaults():
    cfg = SoftMaskConfig()
    assert (cfg.method, cfg.mask_mode, cfg.importance_dtype) == ("spg", "auto", "float32")
    assert cfg.target_modules is None and cfg.exclude_modules is None
    assert cfg.method_config == SPGConfig()


def test_to_dict_from_dict_round_trip():
    cfg = SoftMaskConfig(
        method="spg",
        mask_mode="update",
        target_modules=["query", "value"],
        exclude_modules=".*pooler.*",
        head_modules=["classifier"],
        importance_dtype="uint8",
    )
    d = cfg.to_dict()
    assert d["format_version"] == FORMAT_VERSION
    assert SoftMaskConfig.from_dict(d) == cfg
    assert SoftMaskConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_save_pretrained_writes_sorted_indented_json(tmp_path):
    cfg = SoftMaskConfig(target_modules="fc.*")
    cfg.save_pretrained(tmp_path / "sub")
    path = tmp_path / "sub" / CONFIG_NAME
    text = path.read_text()
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert text.startswith("{\n  ")
    assert data["format_version"] == FORMAT_VERSION and data["target_modules"] == "fc.*"
    assert SoftMaskConfig.from_pretrained(tmp_path / "sub") == cfg
    assert [p.name for p in (tmp_path / "sub").iterdir()] == [CONFIG_NAME]


def test_unknown_key_in_from_dict_is_named():
    with pytest.raises(ConfigError, match="unknown SoftMaskConfig keys: lora_rank"):
        SoftMaskConfig.from_dict({"format_version": 2, "method": "spg", "lora_rank": 8})


def test_json_with_an_extra_key_is_refused(tmp_path):
    data = SoftMaskConfig().to_dict()
    data["surprise"] = 1
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="surprise"):
        SoftMaskConfig.from_pretrained(tmp_path)


def test_unknown_method_is_named_with_the_choices():
    with pytest.raises(ConfigError, match=r"method must be one of \('das', 'spg'\), got 'ewc'"):
        SoftMaskConfig(method="ewc")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mask_mode": "weights"}, "mask_mode"),
        ({"importance_dtype": "int8"}, "importance_dtype"),
        ({"target_modules": 3}, "target_modules"),
        ({"exclude_modules": ["a", 1]}, "exclude_modules"),
        ({"head_modules": {"x": 1}}, "head_modules"),
        ({"target_modules": "fc["}, "target_modules"),
        ({"method": "das", "method_config": {"contrastive_temperature": 0.0}}, "contrastive_temperature"),
        ({"method": "das", "method_config": {"contrastive_weight": "high"}}, "contrastive_weight"),
        ({"method": "das", "method_config": {"dropout": 0.1}}, "dropout"),
        ({"method": "das", "method_config": SPGConfig()}, "DASConfig"),
        ({"method": "das", "method_config": {"contrastive_weight": -0.1}}, "contrastive_weight"),
        ({"method": "das", "method_config": {"contrastive_positive": "none"}}, "contrastive_positive"),
        ({"method": "das", "method_config": {"unit_dropout": True}}, "unit_dropout"),
        ({"method": "das", "method_config": {"unit_dropout_rate": 0.0}}, "unit_dropout_rate"),
        ({"method": "das", "method_config": {"unit_dropout_rate": 1.0}}, "unit_dropout_rate"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        SoftMaskConfig(**kwargs)


def test_config_errors_are_value_errors():
    with pytest.raises(ValueError):
        SoftMaskConfig(mask_mode="x")


def test_tuples_and_sets_become_sorted_lists():
    cfg = SoftMaskConfig(target_modules=("value", "query"), exclude_modules={"b", "a"})
    assert cfg.target_modules == ["query", "value"]
    assert cfg.exclude_modules == ["a", "b"]
    assert SoftMaskConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_unsupported_format_version(tmp_path):
    data = SoftMaskConfig().to_dict()
    data["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(UnsupportedFormatError, match="format_version"):
        SoftMaskConfig.from_dict(data)


def test_missing_corrupt_and_non_object_files(tmp_path):
    with pytest.raises(MissingFileError, match=CONFIG_NAME):
        SoftMaskConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"method": "spg"')
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        SoftMaskConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(CorruptFileError, match="JSON object"):
        SoftMaskConfig.from_pretrained(tmp_path)


def test_das_options_live_in_the_method_config_and_round_trip():
    cfg = SoftMaskConfig(method="das", method_config=DASConfig(contrastive_weight=0.25))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["method"] == "das" and d["method_config"]["contrastive_weight"] == 0.25
    assert SoftMaskConfig.from_dict(d) == cfg
    assert SoftMaskConfig(method="das", method_config={"contrastive_weight": 0.25}) == cfg


def test_a_format_1_config_moves_das_options_into_the_method_config():
    old = {
        "format_version": 1,
        "method": "das",
        "mask_mode": "grad",
        "target_modules": None,
        "exclude_modules": None,
        "head_modules": ["classifier"],
        "importance_dtype": "float32",
        "das_units": None,
        "contrastive_weight": 0.5,
        "contrastive_temperature": 0.1,
        "task_names": ["a"],
        "task_num_classes": [None],
    }
    cfg = SoftMaskConfig.from_dict(old)
    assert cfg.method_config == DASConfig(
        contrastive_weight=0.5, contrastive_temperature=0.1, contrastive_positive="grad"
    )
    assert cfg.mask_mode == "grad" and cfg.head_modules == ["classifier"]
    assert cfg.head_scaling == "all"  # as 0.1.0 scaled every head


def test_a_config_without_format_version_is_refused():
    with pytest.raises(UnsupportedFormatError, match="format_version"):
        SoftMaskConfig.from_dict({"method": "spg"})


def test_the_wrapped_model_owns_a_copy_of_the_config():
    cfg = SoftMaskConfig()
    a, b = get_softmask_model(multi_head(), cfg), get_softmask_model(multi_head(), cfg)
    assert cfg.head_modules is None  # the caller's object is never written
    a.begin_task(0, num_classes=3, name="x")
    assert a.softmask_config is not cfg and b.task_log == ()


def test_head_scaling_is_validated_and_round_trips(tmp_path):
    with pytest.raises(ConfigError, match="head_scaling must be one of \\('all', 'except_new'\\)"):
        SoftMaskConfig(head_scaling="new")
    cfg = SoftMaskConfig(head_scaling="all")
    cfg.save_pretrained(tmp_path)
    assert SoftMaskConfig.from_pretrained(tmp_path) == cfg
    assert SoftMaskConfig().head_scaling == "except_new"
