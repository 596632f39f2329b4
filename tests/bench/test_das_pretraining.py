"""DAS continual pre-training pieces: MLM masking, the masked-position loss, a shortened run."""

from __future__ import annotations

import json

import pytest
import torch
from softmask_bench import (
    das_pretraining,
    das_report,
    das_settings,
    minilm,
    mlm_batches,
    mlm_eval,
    mlm_training,
)
from softmask_bench.text_domains import DOMAINS, TextDomains, TextSplit


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.minilm_path(), local_files_only=True)


def tiny_mlm(vocab: int, seed: int = 0):
    """A 2-layer BertForMaskedLM with MiniLM's vocabulary (random weights, fast)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=64,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return BertForMaskedLM(cfg)


SENTENCES = [
    "the quick brown fox jumps over the lazy dog near the river bank today",
    "permission is hereby granted free of charge to any person obtaining a copy",
    "return a new list containing all items from the iterable in ascending order",
    "this package provides fast tensor computation with strong gpu acceleration",
    "the iris dataset contains three classes of fifty instances each flower",
    "each sample of the wine data has thirteen chemical measurements recorded",
]


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


def test_at_domain_loss_interpolates_and_flags_extrapolation():
    points = [(6.0, 5.0), (5.0, 5.2)]
    assert das_report.at_domain_loss(points, 5.5) == (pytest.approx(5.1), False)
    assert das_report.at_domain_loss(points, 4.5) == (pytest.approx(5.3), True)
    assert das_report.at_domain_loss([(5.0, 1.0), (5.0, 2.0)], 5.0) is None


def test_matched_comparison_reads_the_final_stages():
    def stage(d: float, general: float, cos: float) -> dict:
        return {"loss": {"a": d - 0.5, "b": d + 0.5, "general": general}, "probe_cosine": cos}

    result = {
        "domains": ["a", "b"],
        "methods": {
            "naive": [stage(9.0, 9.0, 0.0), stage(5.0, 5.4, 0.5)],
            "naive lr 5e-05": [stage(6.0, 5.0, 0.9)],
            "das": [stage(5.5, 5.1, 0.8)],
        },
    }
    m = das_report.matched_comparison(result)
    assert m["mean_domain_loss"] == pytest.approx(5.5) and not m["extrapolated"]
    assert m["general"] == {"das": 5.1, "naive": pytest.approx(5.2)}
    assert m["probe_cosine"] == {"das": 0.8, "naive": pytest.approx(0.7)}
    del result["methods"]["naive lr 5e-05"]
    assert das_report.matched_comparison(result) is None


def _tiny_texts() -> TextDomains:
    def split(tag: str) -> TextSplit:
        items = [f"{tag} {s}" for s in SENTENCES]
        return TextSplit(train=items[:4], eval=items[4:])

    return TextDomains({d: split(d.replace("_", " ")) for d in DOMAINS}, split("general"))


def test_shortened_run_reports_every_stage(tokenizer):
    s = das_settings.PretrainSettings(
        steps=2,
        batch_size=2,
        seq_len=32,
        head_steps=3,
        head_tokens=8,
        adapt_steps=2,
        importance_batches=1,
    )
    result = das_pretraining.run_das_pretraining(
        s, _tiny_texts(), (tiny_mlm(len(tokenizer)), tokenizer)
    )
    assert result["base"]["probe_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert result["base"]["loss"]["general"] != result["after_head"]["general"]  # adapted
    assert list(result["methods"]) == ["naive", "naive lr 5e-05", "das"]
    for method in result["methods"]:
        stages = result["methods"][method]
        assert [st["domain"] for st in stages] == list(DOMAINS)
        for st in stages:
            assert set(st["loss"]) == {*DOMAINS, "general"}
            assert all(torch.isfinite(torch.tensor(v)) for v in st["loss"].values())
            assert -1.0 <= st["probe_cosine"] <= 1.0
    assert result["methods"]["naive"][-1]["loss"] != result["methods"]["das"][-1]["loss"]
    assert result["matched"]["general"]["das"] == result["methods"]["das"][-1]["loss"]["general"]
    report = das_report.format_report(result)
    assert "### naive" in report and "### das" in report and "probe cos" in report
    assert "| naive at DAS's domain loss" in report
    json.dumps(result)


def test_das_masks_the_first_domain_with_general_importance(tokenizer):
    s = das_settings.PretrainSettings(steps=1, batch_size=2, seq_len=32, importance_batches=1)
    texts = _tiny_texts()
    net = tiny_mlm(len(tokenizer))
    data = das_pretraining._prepare(texts, tokenizer, s)
    emb = mlm_eval.sentence_embeddings(net, data.probe)
    out = das_pretraining.run_method("das", net, tokenizer, data, s, emb)
    model = out["model"]
    assert model.num_tasks == len(DOMAINS) and model.method.general is not None
    assert model.softmask_config.task_names == list(DOMAINS)
    for k, g in model.method.general.items():
        assert bool((model.task_importance(0)[k] >= g).all())


@pytest.mark.slow
def test_cli_run_on_real_minilm(tmp_path):
    from softmask_peft.cli import main

    argv = ["das-pretrain", "--steps", "2", "--head-steps", "5", "--importance-batches", "1",
            "--eval-passages", "8", "--max-passages", "20", "--adapt-steps", "2", "--matched-lr", "0",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "das_pretraining.md").is_file()
    saved = json.loads((tmp_path / "das_pretraining.json").read_text())
    assert saved["settings"]["steps"] == 2 and set(saved["methods"]) == {"naive", "das"}
    assert saved["matched"] is None
    assert saved["base"]["loss"]["general"] < 10.4  # ln(30522) = 10.33: the head learned something
