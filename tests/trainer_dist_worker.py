"""SoftMaskTrainer's importance pass, run by tests/test_trainer.py in 1 process or 2 (torchrun).

usage: [torchrun --nproc_per_node 2] trainer_dist_worker.py OUT_DIR
The importance pass of task 0 (untrained tiny BERT, no dropout) runs on Trainer's
(rank-sharded) train dataloader; every rank writes OUT_DIR/importance_rank{RANK}.safetensors,
with the number of examples its dataloader gave it in the metadata.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import tiny_bert  # noqa: E402
from hf_data import examples  # noqa: E402

from softmask_peft import SoftMaskConfig, get_softmask_model  # noqa: E402
from softmask_peft.integrations.trainer import SoftMaskTrainer  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    model = get_softmask_model(tiny_bert(dropout=0.0), SoftMaskConfig(head_modules=["classifier"]))
    args = TrainingArguments(
        str(out / "trainer"),
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = SoftMaskTrainer(model, args)
    trainer.train_dataset = examples(n=16, seed=5)
    trainer.begin_task(0)
    importance = trainer.end_task()
    seen = sum(len(batch["labels"]) for batch in trainer.get_train_dataloader())
    rank = int(os.environ.get("RANK", "0"))
    save_file(
        {k: v.contiguous() for k, v in importance.items()},
        str(out / f"importance_rank{rank}.safetensors"),
        metadata={"examples": str(seen)},
    )


if __name__ == "__main__":
    main()
