"""MLM pieces of the DAS study: BERT masking, the masked-position loss, head training, adaptation."""

from __future__ import annotations

import torch
from mlm_helpers import SENTENCES, tiny_mlm
from softmask_bench import das_settings, mlm_batches, mlm_eval, mlm_training


def test_mask_tokens_follows_bert_masking(tokenizer):
    text = " ".join(SENTENCES * 3)
    enc = mlm_batches.encode([text] * 16, tokenizer, seq_len=60, batch_size=16).batches[0]
    enc["attention_mask"][:, 50:] = 0  # pretend the tail is padding
    g = torch.Generator().manual_seed(0)
    out = mlm_batches.mask_tokens(enc, tokenizer, g)
    chosen = out["labels"] != -100
    special = torch.isin(enc["input_ids"], torch.tensor(tokenizer.all_special_ids))
    assert not (chosen & special).any() and not chosen[:, 50:].any()
    assert torch.equal(out["labels"][chosen], enc["input_ids"][chosen])
    rate = chosen.sum() / (~special[:, :50]).sum()
    assert 0.1 < float(rate) < 0.2
    masked = out["input_ids"][chosen] == tokenizer.mask_token_id
    assert 0.65 < float(masked.float().mean()) < 0.95
    untouched = ~chosen
    assert torch.equal(out["input_ids"][untouched], enc["input_ids"][untouched])
    one = {k: v[:1, :4] for k, v in enc.items()}  # tiny rows still predict one token
    assert (mlm_batches.mask_tokens(one, tokenizer, g)["labels"] != -100).sum() == 1


def test_masked_position_loss_equals_the_models_own_loss(tokenizer):
    model = tiny_mlm(len(tokenizer)).eval()
    batch = mlm_batches.fixed_mlm_batches(
        mlm_batches.encode(SENTENCES, tokenizer, 32, 6), tokenizer, seed=1
    )[0]
    loss, pooled = mlm_eval.mlm_forward(model, batch)
    assert torch.allclose(loss, model(**batch).loss, rtol=1e-5)
    hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    m = batch["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose(pooled, (hidden * m).sum(1) / m.sum(1), atol=1e-6)


def test_head_training_moves_only_the_head(tokenizer):
    model = tiny_mlm(len(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = das_settings.PretrainSettings(head_steps=30, head_maskings=2, head_tokens=32, head_lr=1e-2)
    losses = mlm_training.train_mlm_head(
        model, mlm_batches.encode(SENTENCES, tokenizer, 32, 3), tokenizer, s
    )
    assert len(losses) == 30 and losses[-1] < losses[0]
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n.startswith("cls.") and "decoder.weight" not in n), n


def test_mlm_adaptation_trains_the_whole_model(tokenizer):
    model = tiny_mlm(len(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = das_settings.PretrainSettings(adapt_steps=4, adapt_lr=1e-2)
    losses = mlm_training.adapt_mlm(
        model, mlm_batches.encode(SENTENCES, tokenizer, 32, 3), tokenizer, s
    )
    assert len(losses) == 4
    for n, p in model.named_parameters():
        if n != "bert.embeddings.token_type_embeddings.weight":  # one segment: row 1 never used
            assert not torch.equal(p, before[n]), n
