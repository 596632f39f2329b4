"""One rank of a 2-process gloo run (file rendezvous), launched by tests/test_distributed.py.

usage: python dist_worker.py RANK WORLD INIT_FILE OUT_DIR MODE[,MODE...]  (spg, das, nan)
Per mode writes OUT_DIR/{MODE}_rank{RANK}.safetensors (importance, and keep-masks as `keep.{name}`) or, for
`nan`, OUT_DIR/nan_rank{RANK}.txt with the exception type the pass raised.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import classification_batches, small_mlp, text_batches, tiny_bert  # noqa: E402

from softmask_peft import SoftMaskConfig, SoftMaskError, get_softmask_model  # noqa: E402


def model_and_batches(mode: str):
    """The same model on every rank and the full list of batches (each rank takes its share)."""
    if mode == "nan":
        batches = classification_batches(n=16, in_features=6, batch_size=4, seed=3)
        return get_softmask_model(small_mlp(), SoftMaskConfig()), batches
    cfg = SoftMaskConfig(method=mode, head_modules=["classifier"])
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


def main() -> None:
    rank, world, init_file, out, modes = sys.argv[1:6]
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for mode in modes.split(","):
            run(mode, rank, world, Path(out))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
