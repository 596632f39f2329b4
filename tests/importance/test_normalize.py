"""normalize_importance: |tanh((g - mean) / std)| with the unbiased std, and its zero guards."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import standardize_tanh_abs

from softmask_peft.importance.normalize import normalize_importance


def test_closed_form_on_three_values():
    # mean 2, unbiased std 1 -> |tanh(-1)|, |tanh(0)|, |tanh(1)|
    out = normalize_importance(torch.tensor([1.0, 2.0, 3.0]))
    t = math.tanh(1.0)
    torch.testing.assert_close(out, torch.tensor([t, 0.0, t]), rtol=0, atol=1e-7)


def test_uses_unbiased_std():
    # [0, 2]: mean 1, unbiased std sqrt(2) (biased would be 1)
    out = normalize_importance(torch.tensor([0.0, 2.0]))
    expected = math.tanh(1 / math.sqrt(2))
    torch.testing.assert_close(out, torch.tensor([expected, expected]), rtol=0, atol=1e-7)


def test_matches_longhand_reference_on_a_matrix():
    g = torch.randn(5, 7) * 3 + 0.5
    out = normalize_importance(g)
    assert out.shape == g.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), standardize_tanh_abs(g), rtol=0, atol=1e-6)
    assert float(out.min()) >= 0 and float(out.max()) <= 1


@pytest.mark.parametrize(
    "g",
    [torch.zeros(4, 3), torch.full((6,), 2.5), torch.tensor([7.0]), torch.tensor(3.0)],
    ids=["all-zero", "constant", "one-element", "scalar"],
)
def test_degenerate_tensors_give_zero(g):
    out = normalize_importance(g)
    assert out.shape == g.shape
    assert torch.equal(out, torch.zeros_like(g, dtype=torch.float32))


def test_per_dim_statistics():
    g = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [0.0, 0.0, 4.0]])
    out = normalize_importance(g, dim=1)
    t = math.tanh(1.0)
    # row 2: mean 4/3, unbiased std sqrt(16/3)
    std = math.sqrt(((4 / 3) ** 2 * 2 + (8 / 3) ** 2) / 2)
    a, b = math.tanh((4 / 3) / std), math.tanh((8 / 3) / std)
    expected = torch.tensor([[t, 0.0, t], [0.0, 0.0, 0.0], [a, a, b]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_per_dim_with_one_unit_gives_zero():
    assert torch.equal(normalize_importance(torch.randn(4, 1), dim=1), torch.zeros(4, 1))


def test_does_not_modify_input_or_track_grad():
    g = torch.randn(4, requires_grad=True)
    before = g.detach().clone()
    out = normalize_importance(g)
    assert not out.requires_grad
    assert torch.equal(g.detach(), before)
