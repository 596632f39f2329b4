"""Importance methods behind one interface; `METHODS` is the read-only registry."""

from types import MappingProxyType

from .base import ImportanceMethod
from .das import DAS
from .normalize import normalize_importance
from .spg import SPG

METHODS = MappingProxyType({"spg": SPG, "das": DAS})

__all__ = ["DAS", "METHODS", "SPG", "ImportanceMethod", "normalize_importance"]
