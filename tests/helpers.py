"""Tiny models and data shared by the core tests (one place, built in-process, never downloaded)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

from softmask_peft import SoftMaskConfig, SoftMaskOptimizer, get_softmask_model
from softmask_peft.heads import MultiHeadClassifier
from softmask_peft.testing import (
    tiny_bert_config,
    tiny_gpt2_config,
    tiny_llama_config,
    tiny_roberta_config,
)

# for tests that end a task without training it on purpose (importance of a given model, saves):
# the library warns then, and pyproject.toml turns that warning into an error elsewhere
ENDS_UNTRAINED = pytest.mark.filterwarnings("ignore:task \\d+ ended without a single soft-masked")

# uint8 importance (log-keep code, format 3): keep = 1 − A within 2^(1/32) − 1 of its value, so
# |ΔA| <= that bound everywhere (keep <= 1); keeps below 2^-15.9 are stored as A = 1
UINT8_KEEP_RTOL = 2 ** (1 / 32) - 1
UINT8_A_TOL = UINT8_KEEP_RTOL + 1e-6


def linear_model(in_features: int = 4, num_classes: int = 3, seed: int = 0) -> nn.Linear:
    """A single linear layer: logits = W x + b."""
    torch.manual_seed(seed)
    return nn.Linear(in_features, num_classes)


class SmallMLP(nn.Module):
    """Linear -> tanh -> dropout -> linear; a plain single-head classifier."""

    def __init__(self, in_features: int = 6, hidden: int = 8, num_classes: int = 3, p: float = 0.2):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def small_mlp(seed: int = 0, **kwargs) -> SmallMLP:
    torch.manual_seed(seed)
    return SmallMLP(**kwargs)


def multi_head(
    in_features: int = 4, feature_dim: int = 5, backbone: str = "linear", seed: int = 0
) -> MultiHeadClassifier:
    """MultiHeadClassifier on a linear backbone (closed-form gradients) or a tanh MLP."""
    torch.manual_seed(seed)
    if backbone == "linear":
        net: nn.Module = nn.Linear(in_features, feature_dim)
    elif backbone == "mlp":
        net = nn.Sequential(
            nn.Linear(in_features, 7), nn.Tanh(), nn.Linear(7, feature_dim), nn.Tanh()
        )
    else:
        raise ValueError(backbone)
    return MultiHeadClassifier(net, feature_dim)


def tiny_bert(num_labels: int = 3, seed: int = 0, dropout: float = 0.0, **overrides):
    """BertForSequenceClassification from a tiny random BertConfig (no download)."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(num_labels, dropout, **overrides)).eval()


def tiny_gpt2(seed: int = 0, dropout: float = 0.1):
    """GPT2LMHeadModel from a tiny random GPT2Config (no download); GPT-2's dropout is 0.1."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config(dropout)).eval()


def tiny_llama(seed: int = 0, heads: int = 4, kv_heads: int = 2):
    """LlamaForCausalLM (gated MLP, grouped-query attention) from a tiny random config."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(heads, kv_heads)).eval()


def tiny_roberta(seed: int = 0):
    """RobertaForMaskedLM from a tiny random config."""
    from transformers import RobertaForMaskedLM

    torch.manual_seed(seed)
    return RobertaForMaskedLM(tiny_roberta_config()).eval()


def classification_batches(
    n: int = 12, in_features: int = 4, num_classes: int = 3, batch_size: int = 4, seed: int = 1
) -> list[tuple[Tensor, Tensor]]:
    """(x, y) batches of Gaussian inputs and uniform labels, as a list (a re-iterable loader)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def text_batches(
    n: int = 8,
    seq_len: int = 6,
    vocab: int = 40,
    num_labels: int = 3,
    batch_size: int = 4,
    seed: int = 2,
) -> list[dict[str, Tensor]]:
    """HF-style dict batches with input_ids, attention_mask and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq_len), generator=g)
    mask = torch.ones(n, seq_len, dtype=torch.long)
    mask[::2, -2:] = 0
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return [
        {
            "input_ids": ids[i : i + batch_size],
            "attention_mask": mask[i : i + batch_size],
            "labels": labels[i : i + batch_size],
        }
        for i in range(0, n, batch_size)
    ]


def standardize_tanh_abs(g: Tensor) -> Tensor:
    """Reference |tanh((g - mean) / std)| written out longhand in float64 (unbiased std)."""
    v = g.detach().to(torch.float64)
    n = v.numel()
    mean = v.sum() / n
    var = ((v - mean) ** 2).sum() / (n - 1)
    return torch.tanh((v - mean) / var.sqrt()).abs()


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """Independent copy of every tensor of a module's state."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def dir_digest(directory: Path) -> dict[str, str]:
    """File name -> sha256 of every entry in a directory (hidden ones included)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(Path(directory).iterdir())
    }


def run_tasks(model, num_tasks: int, classes=None, in_features: int = 6):
    """Train each task a few SGD steps, then record its importance."""
    for t in range(num_tasks):
        n = classes[t] if classes else 3
        batches = classification_batches(n=12, in_features=in_features, num_classes=n, seed=20 + t)
        model.begin_task(t, num_classes=n if classes else None)
        opt = SoftMaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        model.end_task(batches)
    return model


def assert_same_importance(a, b, tol: float = 0.0) -> None:
    assert a.num_tasks == b.num_tasks
    assert sorted(a.importance) == sorted(b.importance)
    pairs = [(a.importance, b.importance)] + [
        (a.task_importance(k), b.task_importance(k)) for k in range(a.num_tasks)
    ]
    for x, y in pairs:
        for k in x:
            if tol == 0.0:
                assert torch.equal(x[k], y[k]), k
            else:
                assert float((x[k] - y[k]).abs().max()) <= tol, k


# wrapping --------------------------------------------------------------------------------




def saved_mlp(tmp_path, dtype: str = "float32"):
    """A small MLP after two tasks, saved into tmp_path / "ckpt"."""
    net = small_mlp(in_features=6)
    model = run_tasks(get_softmask_model(net, SoftMaskConfig(importance_dtype=dtype)), 2)
    directory = tmp_path / "ckpt"
    model.save_pretrained(directory)
    return model, directory


# byte-level fuzzing of the files the library reads (hypothesis strategies)
byte_edits = st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255), st.sampled_from("fi")),
    min_size=1,
    max_size=6,
)


def mutate_bytes(data: bytes, changes, cut: float | None) -> bytes:
    """Flip ("f") or insert ("i") bytes at relative positions, then optionally truncate."""
    out = bytearray(data)
    for where, value, kind in changes:
        i = int(where * len(out))
        if kind == "f":
            out[i] = value
        else:
            out[i:i] = bytes([value])
    if cut is not None:
        del out[int(cut * len(out)) :]
    return bytes(out)
