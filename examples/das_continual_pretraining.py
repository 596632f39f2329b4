"""Continual MLM pre-training of the real all-MiniLM-L6-v2 over three text domains: DAS vs naive.

    python examples/das_continual_pretraining.py --out results/
    python examples/das_continual_pretraining.py --steps 64 --mask-mode grad   # other budgets

Both methods start from the same base model (MiniLM + an MLM head trained on the general set
with the backbone frozen, then a short whole-model MLM adaptation on it) and get the same number
of AdamW steps per domain; a second, slower naive run gives the comparison at DAS's domain
loss. Prints, per run, the MLM loss on every domain's eval split and on the held-out general set
after each stage, and the mean cosine of probe-sentence embeddings to the base model's; writes
das_pretraining.{md,json} into --out.
Runs offline (HF_HUB_OFFLINE=1); the default budget takes under 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from softmask_bench.commands import DAS_PRETRAIN  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    DAS_PRETRAIN.add_arguments(parser)
    DAS_PRETRAIN.run(parser.parse_args())


if __name__ == "__main__":
    main()
