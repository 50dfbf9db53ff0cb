"""Regularisers and ProSparse's schedule against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from moefy.errors import MoefyError
from moefy.finetune import hoyer_penalty, l1_penalty, prosparse_weight


def test_l1_is_the_mean_absolute_activation_averaged_over_layers():
    a = torch.tensor([[1.0, -2.0], [0.0, 3.0]])  # mean |a| = 1.5
    b = torch.tensor([[4.0, 0.0, 0.0, 0.0]])  # mean |a| = 1.0
    assert float(l1_penalty([a, b])) == pytest.approx(1.25)


def test_hoyer_by_hand():
    a = torch.tensor([[1.0, -1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    # token 1: (2)^2 / (4 * 2) = 0.5; token 2: 2^2 / (4 * 4) = 0.25 (one-hot: 1/F)
    assert float(hoyer_penalty([a])) == pytest.approx(0.375)
    assert float(hoyer_penalty([torch.ones(3, 5)])) == pytest.approx(1.0)  # dense: the maximum


def test_gradients_match_the_analytic_ones():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 6, generator=gen, dtype=torch.float64).requires_grad_()
    l1_penalty([a]).backward()
    torch.testing.assert_close(a.grad, a.detach().sign() / a.numel())
    a.grad = None
    hoyer_penalty([a]).backward()
    x = a.detach()
    n_tokens, width = x.shape
    l1 = x.abs().sum(-1, keepdim=True)
    l2sq = (x * x).sum(-1, keepdim=True)
    expected = (2 * l1 * x.sign() * l2sq - l1 * l1 * 2 * x) / (width * l2sq**2) / n_tokens
    torch.testing.assert_close(a.grad, expected, rtol=1e-6, atol=1e-9)


def test_prosparse_schedule_rises_in_sine_stages():
    final, stages = 2.0, 4
    assert prosparse_weight(0.0, final, stages) == 0.0
    assert prosparse_weight(1.0, final, stages) == pytest.approx(final)
    for i in range(1, stages):  # each stage ends on final * i / stages
        assert prosparse_weight(i / stages - 1e-9, final, stages) == pytest.approx(
            final * i / stages, abs=1e-6
        )
    middle = prosparse_weight(0.125, final, stages)  # halfway through stage 1
    assert middle == pytest.approx(final / stages * math.sin(math.pi / 4))
    points = [prosparse_weight(p / 100, final, stages) for p in range(101)]
    assert all(b >= a for a, b in zip(points, points[1:], strict=False))
    with pytest.raises(MoefyError, match="stage"):
        prosparse_weight(0.5, 1.0, 0)
    with pytest.raises(MoefyError, match="no FFN activations"):
        l1_penalty([])
