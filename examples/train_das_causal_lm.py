"""DAS on a causal LM: protect attention heads and FFN neurons across two text domains.

A tiny random GPT-2 (no download) learns two token "domains" one after the other. DAS measures
the general importance of every unit first (proxy KL between two dropout passes), then each
domain's importance after training on it, and soft-masks the units that matter.
Run: python examples/train_das_causal_lm.py
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from softmask_peft import DASConfig, SoftMaskConfig, SoftMaskOptimizer, get_softmask_model

torch.manual_seed(0)
cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
net = GPT2LMHeadModel(cfg)


def domain(offset: int, n: int = 8) -> list[dict]:
    """Sequences that count upwards from random starts inside a domain's token range."""
    g = torch.Generator().manual_seed(offset)
    starts = torch.randint(offset, offset + 16, (n, 1), generator=g)
    ids = (starts + torch.arange(16)) % 64
    return [{"input_ids": ids[i : i + 4], "labels": ids[i : i + 4]} for i in range(0, n, 4)]


domains = {"low": domain(0), "high": domain(32)}
config = SoftMaskConfig(method="das", method_config=DASConfig(contrastive_weight=0.1))
model = get_softmask_model(net, config)
model.general_importance(domains["low"])  # what the base model knows, before any domain

for t, (name, batches) in enumerate(domains.items()):
    model.begin_task(t, name=name)
    opt = SoftMaskOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), model)  # update masking
    model.train()
    for _ in range(20):
        for batch in batches:
            opt.zero_grad()
            model.training_loss(batch).backward()  # the LM loss + DAS's contrastive term
            opt.step()
    model.end_task(batches)
    with torch.no_grad():
        model.eval()
        losses = {d: sum(float(model(**b).loss) for b in bs) / len(bs) for d, bs in domains.items()}
    print(f"after {name}: " + "  ".join(f"{d} loss {v:.2f}" for d, v in losses.items()))

heads = model.importance["transformer.h.0.softmask_heads"]
print("layer-0 head importance:", [round(float(v), 2) for v in heads])
