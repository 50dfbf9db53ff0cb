"""The "activation" split: balanced experts from activation patterns, exact and Sinkhorn steps."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from moefy.arch import FFNWeights
from moefy.errors import MoefyError
from moefy.moe import SPLIT_METHODS, MoEfyConfig, pattern_kmeans
from moefy.moe.split import SplitRequest, split_neurons
from moefy.moe.split_patterns import (
    exact_balanced_assign,
    pattern_features,
    within_cluster_similarity,
)

TOKENS = 64


def _weights(F: int, D: int = 12, seed: int = 0) -> FFNWeights:
    gen = torch.Generator().manual_seed(seed)
    return FFNWeights(
        w_up=torch.randn(F, D, generator=gen),
        w_down=torch.randn(D, F, generator=gen),
        act=nn.SiLU(),
        w_gate=torch.randn(F, D, generator=gen),
    )


def _shares(F: int, seed: int = 0) -> torch.Tensor:
    """(F, T) contribution shares: each token's column sums to one."""
    gen = torch.Generator().manual_seed(seed)
    contributions = torch.rand(F, TOKENS, generator=gen).square()
    return contributions / contributions.sum(dim=0, keepdim=True)


def _planted(groups: int, size: int, noise: float = 0.0, seed: int = 0):
    """Patterns of ``groups`` neuron groups that fire on their own tokens, shuffled; the truth."""
    gen = torch.Generator().manual_seed(seed)
    F = groups * size
    truth = torch.randperm(F, generator=gen) % groups  # (F,) group of each neuron
    profile = torch.rand(groups, TOKENS, generator=gen).pow(4)  # (G, T) each group's tokens
    patterns = profile[truth] + noise * torch.rand(F, TOKENS, generator=gen)  # (F, T)
    return patterns / patterns.sum(dim=0, keepdim=True), truth


def _request(F: int, num_experts: int, patterns: torch.Tensor | None, seed: int = 0):
    layout = MoEfyConfig(num_experts=num_experts).layout(F)
    return SplitRequest(weights=_weights(F), layout=layout, seed=seed, patterns=patterns)


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_activation_is_registered_as_needing_patterns():
    entry = SPLIT_METHODS.get("activation").value
    assert entry.needs_patterns and not entry.needs_coactivation


@pytest.mark.parametrize(
    ("F", "num_experts"),
    [(96, 12), (100, 8), (100, 12), (130, 16), (37, 5)],  # all but the first pad some experts
)
def test_experts_have_the_layouts_exact_sizes(F: int, num_experts: int):
    request = _request(F, num_experts, _shares(F))
    slots = split_neurons("activation", request)  # (E, S)
    layout = request.layout
    assert slots.shape == (layout.num_experts, layout.expert_size)
    assert torch.equal(slots[slots >= 0].sort().values, torch.arange(F))
    assert (slots >= 0).sum(dim=1).tolist() == list(layout.real_sizes)


def test_same_seed_same_experts():
    patterns = _shares(120, seed=3)
    first = split_neurons("activation", _request(120, 10, patterns, seed=7))
    again = split_neurons("activation", _request(120, 10, patterns, seed=7))
    assert torch.equal(first, again)


@pytest.mark.parametrize("assignment", ["sinkhorn", "exact"])
def test_neurons_with_identical_patterns_land_together(assignment: str):
    patterns, truth = _planted(groups=8, size=12)
    labels = pattern_kmeans(patterns, torch.full((8,), 12), seed=0, assignment=assignment)
    assert _same_partition(labels, truth)


def test_random_split_does_not_find_the_planted_groups():
    patterns, truth = _planted(groups=8, size=12)
    slots = split_neurons("random", _request(96, 8, patterns))
    labels = torch.empty(96, dtype=torch.long)
    labels[slots.flatten()] = torch.arange(8).repeat_interleave(12)
    assert not _same_partition(labels, truth)
    features = pattern_features(patterns)
    assert (
        within_cluster_similarity(features, labels)
        < 0.5
        < within_cluster_similarity(features, truth)
    )


def test_both_assignment_steps_agree_on_noisy_planted_groups():
    patterns, truth = _planted(groups=6, size=10, noise=0.05, seed=1)
    capacities = torch.full((6,), 10)
    sinkhorn = pattern_kmeans(patterns, capacities, seed=2, assignment="sinkhorn")
    exact = pattern_kmeans(patterns, capacities, seed=2, assignment="exact")
    assert _same_partition(sinkhorn, exact)
    assert _same_partition(exact, truth)


def test_needs_patterns_without_a_profile():
    with pytest.raises(MoefyError, match="needs activation patterns"):
        split_neurons("activation", _request(64, 8, patterns=None))


def test_patterns_of_another_layer_are_refused():
    with pytest.raises(MoefyError, match="d_ff=64"):
        split_neurons("activation", _request(64, 8, _shares(80)))


def test_unknown_assignment_is_refused():
    with pytest.raises(MoefyError, match="sinkhorn, exact"):
        pattern_kmeans(_shares(16), torch.full((2,), 8), assignment="hungarian")


def test_exact_assignment_is_optimal_on_a_small_case():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 3, generator=gen)
    capacities = torch.tensor([2, 2, 2])
    labels = exact_balanced_assign(scores, capacities)
    assert torch.bincount(labels, minlength=3).tolist() == [2, 2, 2]
    best = max(
        float(scores[torch.arange(6), torch.tensor(order)].sum())
        for order in set(itertools.permutations([0, 0, 1, 1, 2, 2]))
    )
    assert float(scores[torch.arange(6), labels].sum()) == pytest.approx(best)


def test_features_are_centred_and_projected_when_long():
    patterns = _shares(20)
    centred = pattern_features(patterns, dim=None)
    torch.testing.assert_close(centred.mean(dim=1), torch.zeros(20), atol=1e-7, rtol=0)
    assert pattern_features(patterns, dim=16).shape == (20, 16)
    assert pattern_features(patterns, dim=TOKENS).shape == (20, TOKENS)
    with pytest.raises(MoefyError, match=r"\(F, T\)"):
        pattern_features(torch.rand(4, 4, 4))


def test_within_cluster_similarity_of_known_pairs():
    points = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # pairs in cluster 0: (0, 1) cos 1; cluster 1: (2, 3) cos 1/sqrt(2)
    expected = (1.0 + 2**-0.5) / 2
    assert within_cluster_similarity(points, torch.tensor([0, 0, 1, 1])) == pytest.approx(expected)
