"""Shared pytest setup: offline Hugging Face, deterministic CPU torch, `helpers` importable."""

from __future__ import annotations

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

# ONNX Runtime Training (onnxruntime-training-cpu 1.19.2, its last release) has wheels for
# Python 3.8-3.12 and none for 3.13, where softmask_edge raises RuntimeUnavailableError on
# import. There the device tests are not collected (the report header says so) instead of
# failing collection; on 3.10-3.12 the `onnx` extra installs the runtime and they run.
DEVICE_RUNTIME_EXISTS = sys.version_info[:2] <= (3, 12)
DEVICE_TESTS = ["edge", "test_device.py", "bench/test_device_demo.py"]
collect_ignore = [] if DEVICE_RUNTIME_EXISTS else DEVICE_TESTS


def pytest_report_header(config: pytest.Config) -> str | None:
    if DEVICE_RUNTIME_EXISTS:
        return None
    here = ".".join(map(str, sys.version_info[:2]))
    return (
        f"device tests not collected ({', '.join(DEVICE_TESTS)}): ONNX Runtime Training has no "
        f"build for Python {here} (wheels for 3.8-3.12 only)"
    )


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state, so it is deterministic on its own."""
    torch.manual_seed(0)
