"""One torch thread (the benchmark models are tiny: fastest, immune to a busy machine); MiniLM's tokenizer."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tokenizer():
    """all-MiniLM-L6-v2's tokenizer, from the installed package, offline."""
    from softmask_bench.minilm import minilm_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
