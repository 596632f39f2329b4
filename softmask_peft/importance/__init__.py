"""Importance methods behind one interface, registered by name (`METHODS` is read-only)."""

from .base import ImportanceMethod
from .das import DAS, DASConfig
from .normalize import normalize_importance
from .registry import METHODS, MethodSpec, method_spec, register_method
from .spg import SPG, SPGConfig

register_method("spg", SPGConfig, SPG)
register_method("das", DASConfig, DAS)

__all__ = [
    "DAS",
    "METHODS",
    "SPG",
    "DASConfig",
    "ImportanceMethod",
    "MethodSpec",
    "SPGConfig",
    "method_spec",
    "normalize_importance",
    "register_method",
]
