"""The server-then-device demo returns well-formed accuracy matrices (fast) and shows the
benefit of on-device soft-masking over on-device fine-tuning (slow, full budget)."""

from __future__ import annotations

import json
import math

import pytest
from softmask_bench.device_demo import run_device_demo
from softmask_bench.metrics import compute_metrics
from softmask_bench.training import TrainConfig

from softmask_peft.cli import main
from softmask_peft.errors import ConfigError

KWARGS = dict(torch_tasks=3, train_config=TrainConfig(epochs=1, batch_size=64), device_epochs=2)


@pytest.mark.onnx_runtime
def test_demo_matrices_are_well_formed(tmp_path):
    ort = run_device_demo(**KWARGS, workdir=tmp_path / "ort")
    assert ort.device_tasks == 2 and ort.task_incremental and ort.runtime == "onnxruntime"
    soft, fine = ort.matrices["softmask"], ort.matrices["finetune"]
    assert soft[:3] == fine[:3]  # the PyTorch part is shared
    for matrix in (soft, fine):
        assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
        for i, row in enumerate(matrix):
            assert all((v is None) == (j > i) for j, v in enumerate(row))
            assert all(0.0 <= v <= 100.0 for v in row if v is not None)
    assert ort.metrics["softmask"] == compute_metrics(soft)
    assert (tmp_path / "ort" / "device_softmask" / "manifest.json").is_file()
    with pytest.raises(ConfigError, match="torch_tasks"):
        run_device_demo(torch_tasks=5)


@pytest.mark.onnx_runtime
@pytest.mark.slow  # ~8 s more than the test above; the ExecuTorch demo alone runs by default below
def test_demo_is_equal_within_noise_on_both_runtimes(tmp_path):
    """The same demo on both device runtimes: a shared torch part. The demo's MLP has dropout,
    whose random draws differ between the runtimes (ExecuTorch's kernel is not seeded), so the
    matrices agree within noise, not exactly: ACC within 10 points, far from chance (50 %)."""
    ort = run_device_demo(**KWARGS, workdir=tmp_path / "ort")
    with pytest.warns(UserWarning, match="not reproducible"):
        et = run_device_demo(**KWARGS, workdir=tmp_path / "et", runtime="executorch")
    assert et.runtime == "executorch"
    assert (tmp_path / "et" / "device_softmask" / "training_program.pte").is_file()
    assert et.matrices["softmask"][:3] == ort.matrices["softmask"][:3]  # the shared torch part
    for name in ("softmask", "finetune"):
        assert abs(et.metrics[name]["acc"] - ort.metrics[name]["acc"]) <= 10.0
        assert et.metrics[name]["acc"] >= 70.0


@pytest.mark.onnx_runtime
@pytest.mark.slow
def test_device_softmask_forgets_less_than_device_finetuning():
    result = run_device_demo(torch_tasks=3, device_epochs=10)
    soft, fine = result.metrics["softmask"], result.metrics["finetune"]
    assert soft["acc"] > fine["acc"]
    assert soft["forgetting"] < fine["forgetting"]
    assert math.isfinite(soft["bwt"])


def test_the_demo_command_learns_on_executorch_where_onnx_runtime_may_not_exist(tmp_path, capsys):
    """`softmask-peft demo --runtime executorch`: the device part a Python 3.13 user has (no ONNX
    Runtime Training build exists there); the device tasks far from chance (50 %)."""
    pytest.importorskip("executorch")
    with pytest.warns(UserWarning, match="not reproducible"):  # ExecuTorch's unseeded dropout
        code = main(
            ["demo", "--runtime", "executorch", "--epochs", "2", "--batch-size", "64", "--out", str(tmp_path)]
        )
    assert code == 0
    assert "tasks on the device (ExecuTorch)=2" in capsys.readouterr().out
    runs = json.loads((tmp_path / "split-digits-device_task_mlp.json").read_text())["runs"]
    assert sorted(r["method"] for r in runs) == ["device-finetune", "device-softmask"]
    for run in runs:
        assert [len(row) for row in run["matrix"]] == [5] * 5
        assert run["metrics"]["acc"] >= 70.0  # dropout draws are not seeded on ExecuTorch
