"""The distribution's version, single-sourced from pyproject.toml through the installed metadata."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "softmask-peft"
UNKNOWN_VERSION = "0+unknown"  # running from a source tree that was never installed


def package_version(distribution: str = DISTRIBUTION) -> str:
    """Installed version of `distribution`, or `UNKNOWN_VERSION` if it is not installed."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return UNKNOWN_VERSION


__version__ = package_version()
