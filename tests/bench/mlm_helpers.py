"""A tiny BertForMaskedLM and sentences for the MLM and DAS pre-training tests."""

from __future__ import annotations

import torch

from softmask_peft.testing import tiny_bert_config


def tiny_mlm(vocab: int, seed: int = 0):
    """A 2-layer BertForMaskedLM with MiniLM's vocabulary (random weights, fast)."""
    from transformers import BertForMaskedLM

    torch.manual_seed(seed)
    return BertForMaskedLM(
        tiny_bert_config(dropout=0.1, vocab_size=vocab, max_position_embeddings=64)
    )


SENTENCES = [
    "the quick brown fox jumps over the lazy dog near the river bank today",
    "permission is hereby granted free of charge to any person obtaining a copy",
    "return a new list containing all items from the iterable in ascending order",
    "this package provides fast tensor computation with strong gpu acceleration",
    "the iris dataset contains three classes of fifty instances each flower",
    "each sample of the wine data has thirteen chemical measurements recorded",
]
