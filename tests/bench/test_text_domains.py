"""The three text domains and the general set: built offline, deterministic, split cleanly."""

from __future__ import annotations

import pytest
from softmask_bench.text_domains import (
    DOMAINS,
    dependency_distributions,
    load_text_domains,
    passages,
)


def test_passages_join_short_paragraphs_cut_long_ones_and_drop_noise():
    words = [f"word{chr(97 + i)}" for i in range(25)]
    para = " ".join(words)
    text = (
        f"{para}\n\n{para}\n\n"
        + " ".join(f"long{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(130))
        + "\n\n| 1 | 2 | 3 |"
    )
    out = passages([text, text], min_words=40, max_words=60)
    assert out[0] == " ".join(words + words)  # two 25-word paragraphs joined
    assert [len(p.split()) for p in out[1:]] == [60, 60]  # 130 words -> 60 + 60, 10 left over
    assert len(out) == 3  # the repeated text is deduplicated; the short table is dropped
    numeric = " ".join(["12345 678"] * 30)
    assert passages([numeric], min_words=10) == []  # under 60 % letters


def test_dependencies_are_the_projects_requirements_recursively():
    names = {d.metadata["Name"].lower() for d in dependency_distributions()}
    assert {"torch", "transformers", "numpy", "safetensors", "peft"} <= names
    assert "filelock" in names  # a requirement of torch, not of the project
    assert "softmask-peft" not in names
    assert "pytest" not in names  # an extra (dev), not a requirement


@pytest.fixture(scope="module")
def domains():
    return load_text_domains(max_passages=400, seed=3)


def test_domains_are_deterministic_disjoint_and_sized(domains):
    again = load_text_domains(max_passages=400, seed=3)
    assert list(domains.domains) == list(DOMAINS)
    for name in DOMAINS:
        split = domains.domains[name]
        n = len(split.train) + len(split.eval)
        assert 100 <= n <= 400 and len(split.eval) == round(0.2 * n)
        assert not set(split.train) & set(split.eval)
        assert split.train == again.domains[name].train and split.eval == again.domains[name].eval
    general = domains.general
    assert abs(len(general.train) - len(general.eval)) <= 1 and len(general.eval) >= 20
    assert not set(general.eval) & set(general.train)
    assert domains.summary()["general"] == {"train": len(general.train), "eval": len(general.eval)}


def test_domains_read_their_sources(domains):
    lic = " ".join(domains.domains["licenses"].train).lower()
    assert "permission" in lic and "warranty" in lic
    assert "Return" in " ".join(domains.domains["stdlib_docs"].train)
    general = " ".join(domains.general.train + domains.general.eval).lower()
    assert "iris" in general and "wine" in general
    for split in (*domains.domains.values(), domains.general):
        assert all(40 <= len(p.split()) <= 120 for p in split.train + split.eval)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="max_passages"):
        load_text_domains(max_passages=1)
    with pytest.raises(ValueError, match="eval_fraction"):
        load_text_domains(eval_fraction=1.0)
