"""The importance pass inside Trainer, run by tests/test_trainer.py in 1 process or 2 (torchrun).

usage: [torchrun --nproc_per_node 2] trainer_dist_worker.py OUT_DIR [trainer|callback]
The importance pass of task 0 (untrained tiny BERT, no dropout) runs on Trainer's
(rank-sharded) train dataloader; every rank writes OUT_DIR/importance_rank{RANK}.safetensors,
with the number of examples its dataloader gave it in the metadata.

`trainer`: `SoftMaskTrainer.begin_task` / `end_task`. `callback`: a plain `Trainer` with
`SoftMaskCallback` (task 0 at lr 0, so the pass sees the untrained model), then a task trained
with layer 0 fully protected (A = 1); the rank writes its weights to OUT_DIR/weights_rank{RANK}.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import tiny_bert  # noqa: E402
from hf_data import examples  # noqa: E402

from softmask_peft import SoftMaskConfig, get_softmask_model  # noqa: E402
from softmask_peft.integrations.callback import SoftMaskCallback  # noqa: E402
from softmask_peft.integrations.trainer import SoftMaskTrainer  # noqa: E402
from softmask_peft.testing import seed_importance  # noqa: E402

PROTECTED = "bert.encoder.layer.0."  # fully protected for task 1 in the callback mode


def _args(out: Path, lr: float = 5e-5) -> TrainingArguments:
    return TrainingArguments(
        str(out / "trainer"),
        per_device_train_batch_size=4,
        learning_rate=lr,
        optim="sgd",
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )


def _with_callback(model, out: Path) -> tuple[dict, Trainer]:
    """Task 0 through a plain Trainer + SoftMaskCallback at lr 0; task 1 recorded with
    importance 1 on PROTECTED (0 elsewhere); task 2 trained at lr 0.5. Returns task 0's
    importance and its trainer."""
    callback = SoftMaskCallback(model)
    trainer = Trainer(
        model=model.base_model, args=_args(out, 0.0), train_dataset=examples(n=16, seed=5),
        callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    params = dict(model.base_model.named_parameters())
    seed_importance(
        model,
        {n: torch.full_like(params[n], float(n.startswith(PROTECTED))) for n in model.masked_parameter_names},
    )
    Trainer(
        model=model.base_model, args=_args(out, 0.5), train_dataset=examples(n=16, seed=6),
        callbacks=[callback],
    ).train()  # fmt: skip
    return model.task_importance(0), trainer


def main() -> None:
    out = Path(sys.argv[1])
    mode = sys.argv[2] if len(sys.argv) > 2 else "trainer"
    torch.set_num_threads(1)
    model = get_softmask_model(tiny_bert(dropout=0.0), SoftMaskConfig(head_modules=["classifier"]))
    rank = int(os.environ.get("RANK", "0"))
    if mode == "callback":
        before = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
        importance, trainer = _with_callback(model, out)
        after = dict(model.base_model.named_parameters())
        save_file(
            {f"{k}.before": v.contiguous() for k, v in before.items()}
            | {f"{k}.after": after[k].detach().contiguous() for k in before},
            str(out / f"weights_rank{rank}.safetensors"),
        )
    else:
        trainer = SoftMaskTrainer(model, _args(out))
        trainer.train_dataset = examples(n=16, seed=5)
        trainer.begin_task(0)
        importance = trainer.end_task()
    seen = sum(len(batch["labels"]) for batch in trainer.get_train_dataloader())
    save_file(
        {k: v.contiguous() for k, v in importance.items()},
        str(out / f"importance_rank{rank}.safetensors"),
        metadata={"examples": str(seen)},
    )


if __name__ == "__main__":
    main()
