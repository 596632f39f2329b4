"""The DAS-vs-naive continual pre-training run: a shortened run, DAS's first domain, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from mlm_helpers import SENTENCES, tiny_mlm
from softmask_bench import das_pretraining, das_report, das_settings, mlm_eval
from softmask_bench.text_domains import DOMAINS, TextDomains, TextSplit


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
    assert model.num_tasks == len(DOMAINS) and model.store.general is not None
    assert [t.name for t in model.task_log] == list(DOMAINS)
    for k, g in model.store.general.items():
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
