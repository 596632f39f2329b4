"""Session-scoped artifacts (generation costs ~0.3 s per model); tests work on copies."""

from __future__ import annotations

import pytest
from edge_helpers import clone_case, export_copy, mlp_model_after_two_tasks


@pytest.fixture(scope="session")
def mlp_source(tmp_path_factory):
    """MLP with per-task heads: tasks 0-1 in torch, heads 2 and 3 declared, SGD artifacts."""
    model = mlp_model_after_two_tasks()
    return model, export_copy(model, tmp_path_factory.mktemp("mlp") / "artifacts")


@pytest.fixture
def mlp_case(mlp_source, tmp_path):
    model, artifacts = mlp_source
    return clone_case(model, artifacts, tmp_path / "artifacts")


@pytest.fixture(scope="session")
def executorch_source(tmp_path_factory):
    """The same MLP exported for ExecuTorch, XNNPACK-delegated (the default; an export takes
    ~5-10 s): the parity tests run on the delegated programs."""
    pytest.importorskip("executorch")
    model = mlp_model_after_two_tasks()
    return model, export_copy(
        model, tmp_path_factory.mktemp("et") / "artifacts", runtime="executorch"
    )


@pytest.fixture
def executorch_case(executorch_source, tmp_path):
    model, artifacts = executorch_source
    return clone_case(model, artifacts, tmp_path / "artifacts")


@pytest.fixture(params=[pytest.param("onnxruntime", marks=pytest.mark.onnx_runtime), "executorch"])
def device_case(request):
    """A (model, artifacts) copy for each device runtime: the reliability checks run on both."""
    return request.getfixturevalue(f"{'mlp' if request.param == 'onnxruntime' else 'executorch'}_case")
