"""SoftMaskConfig: validation, dict/JSON round trip, clear errors on bad input."""

from __future__ import annotations

import json

import pytest

from softmask_peft import (
    ConfigError,
    CorruptFileError,
    MissingFileError,
    SoftMaskConfig,
    UnsupportedFormatError,
)
from softmask_peft.constants import CONFIG_NAME, FORMAT_VERSION


def test_defaults():
    cfg = SoftMaskConfig()
    assert (cfg.method, cfg.mask_mode, cfg.importance_dtype) == ("spg", "grad", "float32")
    assert cfg.target_modules is None and cfg.exclude_modules is None
    assert cfg.task_names == [] and cfg.task_num_classes == []


def test_to_dict_from_dict_round_trip():
    cfg = SoftMaskConfig(
        method="spg",
        mask_mode="update",
        target_modules=["query", "value"],
        exclude_modules=".*pooler.*",
        head_modules=["classifier"],
        importance_dtype="uint8",
        task_names=["a", "b"],
        task_num_classes=[2, None],
    )
    d = cfg.to_dict()
    assert d["format_version"] == FORMAT_VERSION
    assert SoftMaskConfig.from_dict(d) == cfg
    assert SoftMaskConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_save_pretrained_writes_sorted_indented_json(tmp_path):
    cfg = SoftMaskConfig(target_modules="fc.*", task_names=["t0"], task_num_classes=[3])
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
        SoftMaskConfig.from_dict({"method": "spg", "lora_rank": 8})


def test_json_with_an_extra_key_is_refused(tmp_path):
    data = SoftMaskConfig().to_dict()
    data["surprise"] = 1
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="surprise"):
        SoftMaskConfig.from_pretrained(tmp_path)


def test_unknown_method_is_named_with_the_choices():
    with pytest.raises(ConfigError, match=r"method must be one of \('spg', 'das'\), got 'ewc'"):
        SoftMaskConfig(method="ewc")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mask_mode": "weights"}, "mask_mode"),
        ({"importance_dtype": "int8"}, "importance_dtype"),
        ({"target_modules": 3}, "target_modules"),
        ({"exclude_modules": ["a", 1]}, "exclude_modules"),
        ({"head_modules": {"x": 1}}, "head_modules"),
        ({"contrastive_temperature": 0.0}, "contrastive_temperature"),
        ({"contrastive_weight": -0.1}, "contrastive_weight"),
        ({"contrastive_positive": "none"}, "contrastive_positive"),
        ({"unit_dropout": True}, "unit_dropout"),
        ({"unit_dropout_rate": 0.0}, "unit_dropout_rate"),
        ({"unit_dropout_rate": 1.0}, "unit_dropout_rate"),
        ({"task_names": ["a"], "task_num_classes": [1, 2]}, "task_num_classes"),
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
