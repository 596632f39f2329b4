"""Continual SFT with TRL + LoRA, soft-masked: two instruction tasks, then a merged model to serve.

    python examples/train_sft_lora.py --out runs/sft

The model is a tiny Llama-style LM built from a config with a character tokenizer (no
downloads); swap in `AutoModelForCausalLM.from_pretrained(...)` and its tokenizer for real use.
The trainer trains your PeftModel exactly as TRL expects; `SoftMaskCallback` masks its optimizer
steps with the importance of earlier tasks, runs the importance pass when `train()` ends and
writes the softmask files into every checkpoint.
"""

from __future__ import annotations

import argparse

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
    softmask = get_softmask_model(model, SoftMaskConfig())  # holds importance and masks
    callback = SoftMaskCallback(softmask)

    tasks = {"reverse": task("reverse", lambda w: w[::-1]), "upper": task("upper", str.upper)}
    for t, (name, data) in enumerate(tasks.items()):
        args = SFTConfig(
            output_dir=f"{out}/{name}",
            num_train_epochs=epochs,
            per_device_train_batch_size=4,
            learning_rate=5e-3,
            save_strategy="epoch",
            report_to=[],
            use_cpu=True,
        )
        SFTTrainer(
            model=model, args=args, train_dataset=data, processing_class=tokenizer,
            callbacks=[callback],
        ).train()  # begins task t, masks every step, ends with the importance pass
        a = softmask.importance
        high = sum(int((v > 0.9).sum()) for v in a.values()) / sum(v.numel() for v in a.values())
        print(f"task {t} ({name}) done: {softmask.num_tasks} task(s) of importance, "
              f"{100 * high:.0f} % of LoRA values with A > 0.9")

    softmask.save_pretrained(f"{out}/continual")  # adapter + importance: the next task starts here
    save_merged(softmask, f"{out}/serve")  # plain transformers folder for serving
    tokenizer.save_pretrained(f"{out}/serve")
    print(f"saved {out}/continual (adapter + importance) and {out}/serve (merged)")


if __name__ == "__main__":
    main()
