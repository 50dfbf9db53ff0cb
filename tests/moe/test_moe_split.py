"""Split methods: balanced experts, reproducible seeds, and clusterings that find structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moefy.moe.split as split
from moefy.arch import FFNWeights
from moefy.errors import MoefyError
from moefy.moe import MoEfyConfig, balanced_assign, balanced_kmeans, coactivation_partition
from moefy.moe.split import SplitRequest, expert_slots, random_partition, rebalance, split_neurons

NUM_GROUPS, GROUP = 8, 16


def _weights(F: int = 100, D: int = 24, gated: bool = True, seed: int = 0) -> FFNWeights:
    gen = torch.Generator().manual_seed(seed)
    return FFNWeights(
        w_up=torch.randn(F, D, generator=gen),
        w_down=torch.randn(D, F, generator=gen),
        act=nn.SiLU(),
        w_gate=torch.randn(F, D, generator=gen) if gated else None,
    )


def _block_coactivation(seed: int = 0, tokens: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    """Co-activation counts of neurons that fire in groups, and the (shuffled) true groups."""
    gen = torch.Generator().manual_seed(seed)
    F = NUM_GROUPS * GROUP
    truth = torch.randperm(F, generator=gen) % NUM_GROUPS  # (F,) group of each neuron
    topic = torch.randint(NUM_GROUPS, (tokens,), generator=gen)  # (T,) one group per token
    in_topic = truth[None, :] == topic[:, None]  # (T, F)
    active = torch.where(in_topic, 0.7, 0.08) > torch.rand(tokens, F, generator=gen)
    counts = active.float().T @ active.float()  # (F, F)
    return counts.long(), truth


def _intra_mass(counts: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of off-diagonal co-activation mass that falls inside experts."""
    off = counts.float().fill_diagonal_(0)
    same = labels[:, None] == labels[None, :]
    return float(off[same].sum() / off.sum())


@pytest.mark.parametrize("method", ["random", "params", "coactivation"])
@pytest.mark.parametrize("num_experts", [8, 12])  # 100 neurons: 12 experts pad to 9 slots
def test_every_method_gives_balanced_experts(method: str, num_experts: int) -> None:
    weights = _weights()
    layout = MoEfyConfig(num_experts=num_experts).layout(weights.d_ff)
    coactivation = _weights(F=100, D=100).w_up.abs() @ _weights(F=100, D=100).w_up.abs().T
    request = SplitRequest(weights=weights, layout=layout, seed=0, coactivation=coactivation)
    slots = split_neurons(method, request)  # (E, S)
    assert slots.shape == (layout.num_experts, layout.expert_size)
    real = slots[slots >= 0]
    assert torch.equal(real.sort().values, torch.arange(100))
    per_expert = (slots >= 0).sum(dim=1)
    assert int(per_expert.max() - per_expert.min()) <= 1


@pytest.mark.parametrize("method", ["random", "params"])
def test_seeded_split_is_reproducible(method: str) -> None:
    layout = MoEfyConfig(num_experts=8).layout(100)
    slots = [
        split_neurons(method, SplitRequest(weights=_weights(), layout=layout, seed=seed))
        for seed in (5, 5, 6)
    ]
    assert torch.equal(slots[0], slots[1])
    assert not torch.equal(slots[0], slots[2])


def test_coactivation_split_is_reproducible() -> None:
    counts, _ = _block_coactivation()
    capacities = torch.full((NUM_GROUPS,), GROUP)
    first = coactivation_partition(counts, capacities, seed=1)
    assert torch.equal(first, coactivation_partition(counts, capacities, seed=1))


@pytest.mark.parametrize("gated", [False, True])
def test_params_clustering_recovers_weight_clusters(gated: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    E, size, D = 8, 12, 32
    truth = torch.randperm(E * size, generator=gen) % E  # (F,)

    def clustered_rows() -> torch.Tensor:
        centers = torch.randn(E, D, generator=gen)
        return centers[truth] + 0.3 * torch.randn(E * size, D, generator=gen)

    weights = FFNWeights(
        w_up=clustered_rows(),
        w_down=torch.randn(D, E * size, generator=gen),
        act=nn.ReLU(),
        w_gate=clustered_rows() if gated else None,
    )
    layout = MoEfyConfig(num_experts=E).layout(E * size)
    slots = split_neurons("params", SplitRequest(weights=weights, layout=layout, seed=0))
    for expert_slots_ in slots:  # every expert holds exactly one true cluster
        assert truth[expert_slots_].unique().numel() == 1


def test_balanced_kmeans_keeps_exact_sizes_on_unbalanced_data() -> None:
    gen = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(70, 16, generator=gen) + 5, torch.randn(30, 16, generator=gen)])
    labels = balanced_kmeans(points, torch.tensor([25, 25, 25, 25]), seed=0)
    assert torch.bincount(labels).tolist() == [25, 25, 25, 25]


def test_coactivation_partition_beats_random() -> None:
    counts, truth = _block_coactivation()
    capacities = torch.full((NUM_GROUPS,), GROUP)
    found = coactivation_partition(counts, capacities, seed=0)
    assert torch.equal(torch.bincount(found), capacities)
    random = _intra_mass(counts, random_partition(capacities, seed=0))
    ours, ideal = _intra_mass(counts, found), _intra_mass(counts, truth)
    assert ours > 2 * random
    assert ours >= 0.95 * ideal


def test_coactivation_fallback_without_metis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(split, "_metis_parts", lambda *args: None)
    counts, truth = _block_coactivation()
    capacities = torch.full((NUM_GROUPS,), GROUP)
    found = coactivation_partition(counts, capacities, seed=0)
    assert torch.equal(torch.bincount(found), capacities)
    assert _intra_mass(counts, found) >= 0.95 * _intra_mass(counts, truth)


def test_balanced_assign_respects_capacity_and_preference() -> None:
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6], [0.1, 0.9]])
    labels = balanced_assign(scores, torch.tensor([2, 2]))
    assert labels.tolist() == [0, 0, 1, 1]  # row 2 loses the contest for column 0
    with pytest.raises(MoefyError):
        balanced_assign(scores, torch.tensor([1, 1]))


def test_rebalance_makes_exact_sizes() -> None:
    counts, _ = _block_coactivation()
    affinity = split.coactivation_affinity(counts)
    lopsided = torch.arange(128) % 8
    lopsided[:10] = 0  # expert 0 overfull
    fixed = rebalance(lopsided, affinity, torch.full((8,), 16))
    assert torch.bincount(fixed, minlength=8).tolist() == [16] * 8


def test_unbalanced_custom_split_is_rejected() -> None:
    layout = MoEfyConfig(num_experts=2).layout(4)
    with pytest.raises(MoefyError, match="unbalanced"):
        expert_slots(torch.tensor([0, 0, 0, 1]), layout)


def test_coactivation_needs_counts_of_the_right_size() -> None:
    layout = MoEfyConfig(num_experts=4).layout(100)
    request = SplitRequest(weights=_weights(), layout=layout, seed=0)
    with pytest.raises(MoefyError, match="profile"):
        split_neurons("coactivation", request)
    bad = SplitRequest(weights=_weights(), layout=layout, seed=0, coactivation=torch.ones(50, 50))
    with pytest.raises(MoefyError, match="d_ff=100"):
        split_neurons("coactivation", bad)


def test_a_split_method_is_one_function_and_one_register_call():
    from moefy.moe import SPLIT_METHODS, register_split_method

    @register_split_method("contiguous-test", help="neurons in dense order")
    def contiguous(request: SplitRequest) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(request.capacities)), request.capacities)

    try:
        config = MoEfyConfig(num_experts=2, method="contiguous-test")  # the config knows it
        assert SPLIT_METHODS.get("contiguous-test").help == "neurons in dense order"
        request = SplitRequest(weights=_weights(F=4), layout=config.layout(4), seed=0)
        assert split_neurons("contiguous-test", request).tolist() == [[0, 1], [2, 3]]
    finally:
        SPLIT_METHODS.unregister("contiguous-test")
    with pytest.raises(MoefyError, match="contiguous-test"):
        MoEfyConfig(num_experts=2, method="contiguous-test")
    assert SPLIT_METHODS.names() == ["random", "params", "coactivation", "activation"]
