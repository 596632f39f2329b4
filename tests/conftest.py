"""Shared pytest setup: offline Hugging Face, deterministic CPU torch, `helpers` importable."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

# ONNX Runtime Training (onnxruntime-training-cpu 1.19.2, its last release) has wheels for Python
# 3.8-3.12 and none for 3.13. A run on a Python without it says so explicitly, with
# SOFTMASK_WITHOUT_ONNX_RUNTIME=1 (.ci/run's Python 3.13 job sets it): the modules below and the
# tests marked `onnx_runtime` are then skipped, and the variable is refused where onnx or
# onnxruntime can be imported. Without the variable nothing is skipped, so a run that lacks
# the runtime fails (collection errors). What does run there: the core, the ExecuTorch device
# side, and the ONNX paths' RuntimeUnavailableError (test_docs, test_reliability).
WITHOUT_ONNX = "SOFTMASK_WITHOUT_ONNX_RUNTIME"
WITHOUT_ONNX_RUNTIME = os.environ.get(WITHOUT_ONNX) == "1"
ONNX_MODULES = {  # need onnx or onnxruntime in every test (most import them at their top)
    "edge/test_edge_client.py",
    "edge/test_edge_format.py",
    "edge/test_edge_fuzz.py",
    "edge/test_edge_graphs.py",
    "edge/test_edge_models.py",
    "edge/test_edge_no_torch.py",
    "edge/test_edge_reliability.py",
    "edge/test_edge_storage.py",
    "test_device.py",
}
ONNX_FIXTURES = {"mlp_source"}  # tests/edge/conftest.py: ONNX Runtime artifacts
_TESTS = Path(__file__).resolve().parent
_WHY = f"needs ONNX Runtime Training, which this Python does not have ({WITHOUT_ONNX}=1)"


def pytest_configure(config: pytest.Config) -> None:
    present = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is not None]
    if WITHOUT_ONNX_RUNTIME and present:
        raise pytest.UsageError(
            f"{WITHOUT_ONNX}=1 skips the ONNX Runtime tests, but {' and '.join(present)} "
            "can be imported here: unset it so they run"
        )


def pytest_report_header(config: pytest.Config) -> str | None:
    if not WITHOUT_ONNX_RUNTIME:
        return None
    here = ".".join(map(str, sys.version_info[:2]))
    return (
        f"{WITHOUT_ONNX}=1: tests that need ONNX Runtime Training are skipped on Python {here} "
        f"({len(ONNX_MODULES)} modules and the tests marked onnx_runtime)"
    )


class _SkippedModule(pytest.Module):
    """An ONNX Runtime module, not imported (its top-level `import onnx` would fail)."""

    def collect(self):
        module = self.path.relative_to(_TESTS).as_posix()
        raise pytest.skip.Exception(f"{module} {_WHY}", allow_module_level=True)


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector):
    if WITHOUT_ONNX_RUNTIME and module_path.relative_to(_TESTS).as_posix() in ONNX_MODULES:
        return _SkippedModule.from_parent(parent, path=module_path)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if ONNX_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.onnx_runtime)
        if WITHOUT_ONNX_RUNTIME and item.get_closest_marker("onnx_runtime"):
            item.add_marker(pytest.mark.skip(reason=_WHY))

@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state, so it is deterministic on its own."""
    torch.manual_seed(0)
