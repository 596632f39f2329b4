"""The harness's `softmask-peft` subcommands: help, clear errors, a short real benchmark run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from softmask_peft.cli import main


@pytest.fixture(autouse=True)
def _restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_module_help_lists_the_harness_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "softmask_peft", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("demo", "bench", "das-pretrain"):
        assert name in out


MISSING_EXTRA = """
import sys
sys.modules["sklearn"] = None  # as if the bench extra were not installed
from softmask_peft.cli import main
sys.exit(main(["demo", "--out", sys.argv[1]]))
"""


def test_command_without_its_extra_names_the_pip_command(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", MISSING_EXTRA, str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "sklearn" in proc.stderr and 'pip install "softmask-peft[bench]"' in proc.stderr
    assert not (tmp_path / "out").exists(), "nothing runs without the extra"


NO_ONNX_RUNTIME = """
import argparse, sys
sys.modules["onnxruntime"] = None  # as on a Python with no wheel (3.13)
from softmask_bench.commands import _device_demo
_device_demo(argparse.Namespace(runtime="onnxruntime"))
"""


def test_demo_without_onnx_runtime_names_what_works_on_this_python() -> None:
    """The device part's advice installs something real: the `onnx` extra up to Python 3.12;
    on 3.13, where that extra installs nothing, the ExecuTorch runtime."""
    proc = subprocess.run([sys.executable, "-c", NO_ONNX_RUNTIME], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("device part skipped: ") and "--runtime executorch" in out, out
    if sys.version_info[:2] <= (3, 12):
        assert "pip install 'softmask-peft[onnx]'" in out, out
    else:
        assert "no build for Python" in out and "pip install" not in out, out


def test_bench_help_explains_methods(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("spg-update", "ewc", "joint", "--benchmark", "--seeds", "early stopping"):
        assert word in out


def test_unknown_benchmark_is_rejected(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--benchmark", "split-cifar"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "split-cifar" in err and "split-digits" in err


def test_unknown_method_is_named_with_the_choices(tmp_path, capsys) -> None:
    assert main(["bench", "--methods", "spg,magic", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "magic" in err and "spg-update" in err
    assert not any(tmp_path.iterdir()), "nothing is written for a bad command"


def test_short_benchmark_run_spg_forgets_less_than_finetune(tmp_path, capsys) -> None:
    code = main(
        [
            "bench",
            "--benchmark",
            "split-digits",
            "--methods",
            "spg,finetune",
            "--seeds",
            "1",
            "--epochs",
            "10",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    stem = tmp_path / "split-digits_task_mlp"
    report = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "task-incremental" in stem.with_suffix(".md").read_text()
    assert "task-incremental" in capsys.readouterr().out
    forgetting = {run["method"]: run["metrics"]["forgetting"] for run in report["runs"]}
    assert forgetting["spg"] < forgetting["finetune"]  # the metrics' formulas: test_metrics.py


def test_protocol_and_hidden_reach_the_train_config(capsys) -> None:
    import argparse

    from softmask_bench.commands import _bench_arguments, _train_config

    parser = argparse.ArgumentParser()
    _bench_arguments(parser)
    cfg = _train_config(parser.parse_args(["--protocol", "fixed", "--hidden", "64,32", "--epochs", "7"]))
    assert (cfg.protocol, cfg.mlp_hidden, cfg.epochs) == ("fixed", (64, 32), 7)
    assert "patience" not in cfg.to_dict(), "early-stopping options are not reported as used"
    with pytest.raises(SystemExit):
        parser.parse_args(["--hidden", "64,0"])
    assert "must be >= 1" in capsys.readouterr().err


def test_adapter_options_merge_as_json_values() -> None:
    import argparse

    from softmask_bench.commands import _bench_arguments

    parser = argparse.ArgumentParser()
    _bench_arguments(parser)
    args = parser.parse_args(
        ["--adapter-option", "adapter_scale=4", "--adapter-option", "adapter_freeze_a=true"]
    )
    assert args.adapter_option == {"adapter_scale": 4, "adapter_freeze_a": True}
    assert parser.parse_args([]).adapter_option == {}
