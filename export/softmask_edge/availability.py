"""Whether this Python can run ONNX Runtime Training, with one clear error where it cannot.

onnxruntime-training-cpu 1.19.2, the last training release, has wheels for CPython 3.8-3.12;
onnx must stay < 1.17 (newer onnx writes IR versions ORT 1.19 refuses). ExecuTorch artifacts
need neither, so this is checked only where ONNX artifacts are built or opened.
"""

from __future__ import annotations

import importlib
import sys

from .errors import RuntimeUnavailableError

LAST_RUNTIME_PYTHON = (3, 12)


def require_onnx_runtime() -> None:
    """Raise `RuntimeUnavailableError` naming what to install (or that nothing exists for this
    Python) when onnx or onnxruntime cannot be imported."""
    missing = []
    for module in ("onnx", "onnxruntime"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if not missing:
        return
    here = ".".join(map(str, sys.version_info[:2]))
    if sys.version_info[:2] > LAST_RUNTIME_PYTHON:
        advice = (
            f"ONNX Runtime Training has no build for Python {here} (onnxruntime-training-cpu "
            "1.19.2, the last release, has wheels for Python 3.8-3.12): run ONNX artifacts on "
            "Python 3.12 or older, or export for ExecuTorch (runtime='executorch')"
        )
    else:
        advice = "install it with: pip install 'softmask-peft[onnx]'"
    raise RuntimeUnavailableError(
        f"ONNX Runtime artifacts need {' and '.join(missing)} (onnxruntime-training-cpu==1.19.2, "
        f"onnx<1.17), not installed here; {advice}"
    )
