"""Continual SFT with TRL + LoRA, soft-masked: two instruction tasks, then a merged model to serve.

    python examples/train_sft_lora.py --out runs/sft

The model is a tiny Llama-style LM built from a config with a character tokenizer (no
downloads); swap in `AutoModelForCausalLM.from_pretrained(...)` and its tokenizer for real use.
The trainer trains your PeftModel exactly as TRL expects; `SoftMaskCallback` masks its optimizer
steps, ends each task when `train()` ends and writes the softmask files into every checkpoint.
A LoRA PeftModel gets the LoRA subspace mask (SoftMaskConfig's default, `lora_subspace.py`):
A's SGD step is soft-masked away from the input directions earlier tasks used, and each task's
adapter is folded into the base weights when the task ends. It needs SGD (`optim="sgd"`).
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from softmask_bench.char_lm import char_tokenizer, tiny_causal_lm
from trl import SFTConfig, SFTTrainer

from softmask_peft import SoftMaskConfig, get_softmask_model
from softmask_peft.integrations.callback import SoftMaskCallback
from softmask_peft.merge import save_merged

WORDS = ["cat", "dog", "fish", "bird", "lion", "wolf", "bear", "frog", "duck", "goat", "mole", "seal"]


def task(name: str, fn) -> Dataset:
    return Dataset.from_list(
        [{"prompt": f"{name}: {w} =>", "completion": " " + fn(w)} for w in WORDS]
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/sft")
    ap.add_argument("--epochs", type=int, default=2)
    opts = ap.parse_args()
    out, epochs = opts.out, opts.epochs

    tokenizer = char_tokenizer()
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(tiny_causal_lm(len(tokenizer)), lora)  # your PeftModel
    softmask = get_softmask_model(model, SoftMaskConfig())  # LoRA: the subspace mask
    callback = SoftMaskCallback(softmask)

    tasks = {"reverse": task("reverse", lambda w: w[::-1]), "upper": task("upper", str.upper)}
    for t, (name, data) in enumerate(tasks.items()):
        args = SFTConfig(
            output_dir=f"{out}/{name}",
            num_train_epochs=epochs,
            per_device_train_batch_size=4,
            optim="sgd",
            learning_rate=0.3,
            save_strategy="epoch",
            report_to=[],
            use_cpu=True,
        )
        SFTTrainer(
            model=model, args=args, train_dataset=data, processing_class=tokenizer,
            callbacks=[callback],
        ).train()  # begins task t, masks every step, ends it: covariances, then the fold
        a = torch.cat(list(softmask.lora_subspace.protection().values()))
        print(f"task {t} ({name}) done: {softmask.num_tasks} task(s) learned, "
              f"{100 * float((a > 0.5).float().mean()):.0f} % of input directions protected > 0.5")

    softmask.save_pretrained(f"{out}/continual")  # adapter, folded layers, covariances
    save_merged(softmask, f"{out}/serve")  # plain transformers folder for serving
    tokenizer.save_pretrained(f"{out}/serve")
    print(f"saved {out}/continual (to continue) and {out}/serve (merged)")


if __name__ == "__main__":
    main()
