"""The method registry: each importance method registers its name, its config and its class.

As PEFT maps a `peft_type` to its config and tuner, `method` in a `SoftMaskConfig` is the
discriminator that picks a `MethodSpec`; the registry is the one source of method names.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError

_REGISTRY: dict[str, MethodSpec] = {}


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: `config_class()` holds its options, `method_class` computes importance."""

    name: str
    config_class: type
    method_class: type


METHODS: MappingProxyType[str, MethodSpec] = MappingProxyType(_REGISTRY)


def register_method(name: str, config_class: type, method_class: type) -> None:
    """Make `name` selectable as `SoftMaskConfig(method=name)`; a name registers once."""
    if name in _REGISTRY:
        raise ConfigError(f"importance method {name!r} is already registered")
    _REGISTRY[name] = MethodSpec(name, config_class, method_class)


def method_spec(name: Any) -> MethodSpec:
    """The spec registered under `name`, or a `ConfigError` listing the known names."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"method must be one of {tuple(sorted(_REGISTRY))}, got {name!r}")
    return _REGISTRY[name]
