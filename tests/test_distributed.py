"""Importance under data parallelism: 2 real gloo processes on CPU (file rendezvous, bounded)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import text_batches, tiny_bert
from safetensors.torch import load_file

from softmask_peft import SoftMaskConfig, get_softmask_model
from softmask_peft.config import PAPER_CAPACITY

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
ROOT = Path(__file__).resolve().parents[1]


def launch(tmp_path: Path, modes: str, world: int = 2, may_die: tuple[int, ...] = ()) -> None:
    """Run `world` ranks of dist_worker.py; fail the test if any rank (other than those that
    `may_die`) fails, or any hangs."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    init = tmp_path / "rendezvous"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(world), str(init), str(tmp_path), modes],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    try:
        outs = [p.communicate(timeout=180)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 or r in may_die, out[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One 2-process launch for every case (process start-up dominates the cost)."""
    out = tmp_path_factory.mktemp("ddp")
    launch(out, "spg,das,nan,subspace")
    return out


@pytest.mark.parametrize("method", ["spg", "das"])
def test_two_ranks_get_the_single_process_importance_and_masks(runs, method):
    ranks = [load_file(runs / f"{method}_rank{r}.safetensors") for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # bit-identical on every rank
    # the paper's rule: a budget picks each tensor's top values, and a value at the edge may
    # flip between reduction orders (two shards summed vs one pass) though the sums agree
    cfg = SoftMaskConfig(method=method, head_modules=["classifier"], **PAPER_CAPACITY)
    single = get_softmask_model(tiny_bert(dropout=0.0), cfg)
    single.begin_task(0)
    expected = single.end_task(text_batches(n=16, seed=4))  # all batches, one process
    assert sorted(expected) == sorted(k for k in ranks[0] if not k.startswith("keep."))
    for k, v in expected.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5)
    assert any(float(v.max()) > 0.5 for v in expected.values())  # not a trivial all-zero case


def test_two_ranks_get_the_single_process_lora_subspace(runs):
    from dist_worker import subspace_model

    ranks = [load_file(runs / f"subspace_rank{r}.safetensors") for r in range(2)]
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # the same C and K on every rank
    single = subspace_model()  # all batches, one process
    single.add_covariance(text_batches(n=16, seed=4))
    expected = single.state_dict()
    assert sorted(expected) == sorted(k for k in ranks[0] if not k.startswith("keep."))
    for k, v in expected.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-5, atol=1e-6)
    assert all(float((ranks[0][f"keep.{n}"] - torch.eye(len(c))).abs().max()) > 0.1
               for n, c in single.covariance.items())  # a mask that protects something


def test_a_nan_on_one_rank_raises_on_every_rank(runs):
    texts = [(runs / f"nan_rank{r}.txt").read_text() for r in range(2)]
    assert texts == ["NonFiniteGradientError"] * 2


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> Path:
    """One 2-process launch through every fault on rank 1 (the kill last)."""
    out = tmp_path_factory.mktemp("ddp_faults")
    launch(out, "empty,badbatch,names,sizes,kill", may_die=(1,))
    return out


def outcome(runs: Path, mode: str, rank: int) -> tuple[str, float]:
    kind, seconds = (runs / f"{mode}_rank{rank}.txt").read_text().split()
    return kind, float(seconds)


@pytest.mark.parametrize(
    "mode, own",
    [("empty", "EmptyDataError"), ("badbatch", "BatchError"), ("names", "DistributedError"),
     ("sizes", "DistributedError")],
)
def test_a_fault_on_one_rank_raises_the_library_error_on_every_rank_at_once(faults, mode, own):
    """An error on one rank, or ranks with different models (same or other sizes): every rank
    raises within seconds (the group's timeout is 60 s here, 30 min by default)."""
    (kind0, t0), (kind1, t1) = outcome(faults, mode, 0), outcome(faults, mode, 1)
    assert (kind0, kind1) == ("DistributedError", own)
    assert max(t0, t1) < 20


def test_a_killed_rank_gives_the_survivor_a_library_error(faults):
    kind, seconds = outcome(faults, "kill", 0)
    assert kind == "DistributedError"
    assert seconds < 30
    assert not (faults / "kill_rank1.txt").exists()  # rank 1 really died
