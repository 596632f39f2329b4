"""One rank of a 2-process gloo run (file rendezvous), launched by tests/test_distributed.py.

usage: python dist_worker.py RANK WORLD INIT_FILE OUT_DIR MODE[,MODE...]  (spg, das, nan,
subspace, and the faults empty, badbatch, names, sizes, kill)
Per mode writes OUT_DIR/{MODE}_rank{RANK}.safetensors (importance, and keep-masks as `keep.{name}`) or, for
`nan`, OUT_DIR/nan_rank{RANK}.txt with the exception type the pass raised. A fault mode writes
OUT_DIR/{MODE}_rank{RANK}.txt: "<exception type> <seconds from the common start>"; in `kill`
rank 1 kills itself (SIGKILL) in the middle of its pass.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import SmallMLP, classification_batches, small_mlp, text_batches, tiny_bert  # noqa: E402
from torch import nn  # noqa: E402

from softmask_peft import SoftMaskConfig, SoftMaskError, get_softmask_model  # noqa: E402
from softmask_peft.config import PAPER_CAPACITY  # noqa: E402


def model_and_batches(mode: str):
    """The same model on every rank and the full list of batches (each rank takes its share)."""
    if mode == "nan":
        batches = classification_batches(n=16, in_features=6, batch_size=4, seed=3)
        return get_softmask_model(small_mlp(), SoftMaskConfig()), batches
    cfg = SoftMaskConfig(method=mode, head_modules=["classifier"], **PAPER_CAPACITY)
    return get_softmask_model(tiny_bert(dropout=0.0), cfg), text_batches(n=16, seed=4)


def run(mode: str, rank: int, world: int, out: Path) -> None:
    model, batches = model_and_batches(mode)
    mine = batches[rank::world]
    if mode == "nan" and rank == 1:
        mine[0][0][0, 0] = float("nan")
    model.begin_task(0)
    try:
        importance = model.end_task(mine)
    except SoftMaskError as e:
        (out / f"{mode}_rank{rank}.txt").write_text(type(e).__name__)
        return
    model.begin_task(1)
    keep = {f"keep.{n}": 1 - a for n, a in model.parameter_importance().items()}
    tensors = {k: v.contiguous() for k, v in {**importance, **keep}.items()}
    save_file(tensors, str(out / f"{mode}_rank{rank}.safetensors"))


def subspace_model():
    """The LoRA subspace mask of a LoRA tiny BERT's SoftMaskModel (same on every rank)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=2, target_modules=["query", "value"])
    model = get_softmask_model(get_peft_model(tiny_bert(dropout=0.0), lora), SoftMaskConfig())
    return model.lora_subspace


def subspace(rank: int, world: int, out: Path) -> None:
    """Each rank passes its shard of the same text batches; writes the covariances and keeps."""
    lora = subspace_model()
    mine = text_batches(n=16, seed=4)[rank::world]  # dict batches with padding
    lora.add_covariance(mine)
    keep = {f"keep.{n}": k for n, k in lora.keep.items()}
    tensors = {k: v.contiguous() for k, v in {**lora.state_dict(), **keep}.items()}
    save_file(tensors, str(out / f"subspace_rank{rank}.safetensors"))


class RenamedMLP(SmallMLP):
    """SmallMLP's shapes under other parameter names."""

    def __init__(self) -> None:
        super().__init__(in_features=6)
        self.lin1, self.lin2 = self.fc1, self.fc2
        del self.fc1, self.fc2

    def forward(self, x):
        return self.lin2(self.drop(torch.tanh(self.lin1(x))))


FAULTS = ("empty", "badbatch", "names", "sizes", "kill")


def fault(mode: str, rank: int, world: int, out: Path) -> None:
    """One fault on rank 1; every rank records what it raised and when."""
    torch.manual_seed(0)
    net: nn.Module = small_mlp(in_features=6)
    if rank == 1 and mode == "names":
        net = RenamedMLP()
    if rank == 1 and mode == "sizes":
        net = small_mlp(in_features=6, hidden=9)
    model = get_softmask_model(net, SoftMaskConfig())
    mine = classification_batches(n=16, in_features=6, batch_size=4, seed=3)[rank::world]
    if rank == 1 and mode == "empty":
        mine = []
    if rank == 1 and mode == "badbatch":
        mine[1] = (mine[1][0], torch.tensor([0, 1, 7, 2]))

    def batches():
        for k, b in enumerate(mine):
            if rank == 1 and mode == "kill" and k == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            yield b

    model.begin_task(0)
    dist.barrier()
    start = time.monotonic()
    try:
        model.end_task(batches())
        outcome = "ok"
    except Exception as e:  # noqa: BLE001  (the test checks the type)
        outcome = type(e).__name__
    (out / f"{mode}_rank{rank}.txt").write_text(f"{outcome} {time.monotonic() - start:.2f}")


def main() -> None:
    rank, world, init_file, out, modes = sys.argv[1:6]
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),  # a hang must end the test, not run 30 minutes
    )
    for mode in modes.split(","):
        if mode == "subspace":
            subspace(rank, world, Path(out))
        else:
            (fault if mode in FAULTS else run)(mode, rank, world, Path(out))
    if "kill" in modes.split(","):
        # rank 1 was killed: gloo's teardown in the survivor can abort (SIGABRT, "terminate
        # called without an active exception"; seen on 3.11 and 3.13, with or without
        # destroy_process_group). Every outcome is written by now: leave without the teardown.
        sys.stdout.flush()
        os._exit(0)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
