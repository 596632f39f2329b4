"""The `softmask-peft` command: help, clear errors, and a short real benchmark run."""

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


def test_module_help_lists_subcommands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "softmask_peft", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "demo" in out and "bench" in out


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
    forgetting = {}
    for run in report["runs"]:
        r = run["matrix"]
        t = len(r)
        assert run["metrics"]["acc"] == pytest.approx(sum(r[-1]) / t)
        forgetting[run["method"]] = sum(
            max(r[i][j] for i in range(j, t - 1)) - r[t - 1][j] for j in range(t - 1)
        ) / (t - 1)
        assert run["metrics"]["forgetting"] == pytest.approx(forgetting[run["method"]])
    assert forgetting["spg"] < forgetting["finetune"]


def test_protocol_and_hidden_reach_the_train_config(capsys) -> None:
    from softmask_peft.cli import _train_config, build_parser

    args = build_parser().parse_args(
        ["bench", "--protocol", "fixed", "--hidden", "64,32", "--epochs", "7"]
    )
    cfg = _train_config(args)
    assert (cfg.protocol, cfg.mlp_hidden, cfg.epochs) == ("fixed", (64, 32), 7)
    assert "patience" not in cfg.to_dict(), "early-stopping options are not reported as used"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--hidden", "64,0"])
    assert "must be >= 1" in capsys.readouterr().err
