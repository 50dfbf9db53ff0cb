"""MoEFFN: exact with every expert for every architecture, grouped dispatch, oracle selection."""

from __future__ import annotations

import pytest
import torch

from moefy.arch import find_ffns
from moefy.errors import MoefyError
from moefy.moe import MoEFFN, MoEfyConfig, OracleSelector, moe_layers, moefy_, set_selection
from moefy.moe.split import SplitRequest, split_neurons
from tiny_models import ARCH_NAMES, tiny_inputs, tiny_model


def _moe_for(site, num_experts: int = 8, method: str = "random") -> MoEFFN:
    weights = site.weights()
    layout = MoEfyConfig(num_experts=num_experts).layout(weights.d_ff)
    slots = split_neurons(method, SplitRequest(weights=weights, layout=layout, seed=0))
    return MoEFFN.from_dense(weights, slots)


def _tokens(d_model: int, n: int = 10) -> torch.Tensor:
    return torch.randn(n, d_model, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_all_experts_equal_dense_model(name: str, run, fp32) -> None:
    model = tiny_model(name)
    inputs = tiny_inputs(name)
    dense = run(model, inputs)
    moefy_(model, MoEfyConfig(num_experts=8, method="params"))
    assert len(moe_layers(model)) == len(find_ffns(tiny_model(name)))
    torch.testing.assert_close(run(model, inputs), dense, **fp32)


@pytest.mark.parametrize("name", ARCH_NAMES)
@pytest.mark.parametrize("num_experts", [8, 10])  # 10 experts pad d_ff=64 to 70 slots
def test_grouped_dispatch_with_every_expert_equals_dense_ffn(name: str, num_experts: int, fp32):
    site = find_ffns(tiny_model(name))[0]
    moe = _moe_for(site, num_experts)
    x = _tokens(moe.d_model)
    everything = torch.ones(x.shape[0], num_experts, dtype=torch.bool)
    with torch.no_grad():
        dense = site.weights()(x)
        torch.testing.assert_close(moe._forward_grouped(x, everything), dense, **fp32)
        torch.testing.assert_close(moe(x), dense, **fp32)


@pytest.mark.parametrize("name", ["llama", "gpt2", "phi3", "opt", "t5-gated"])
def test_partial_selection_equals_masked_dense(name: str, fp32) -> None:
    site = find_ffns(tiny_model(name))[0]
    weights = site.weights()
    moe = _moe_for(site)
    x = _tokens(moe.d_model, n=12)
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(12, 8, generator=gen) < 0.4  # (N, E)
    # Reference: zero the neurons of unselected experts in the dense hidden state.
    expert_of = torch.empty(weights.d_ff, dtype=torch.long)
    for e, slots in enumerate(moe.perm):
        expert_of[slots[slots >= 0]] = e
    with torch.no_grad():
        hidden = weights.hidden(x) * mask[:, expert_of]  # (N, F)
        expected = torch.nn.functional.linear(hidden, weights.w_down, weights.b_down)
        moe.select_next(mask)
        torch.testing.assert_close(moe(x), expected, **fp32)


def test_oracle_picks_largest_norm_experts() -> None:
    site = find_ffns(tiny_model("llama"))[0]
    weights = site.weights()
    moe = _moe_for(site)
    moe.selector.set_topk(k=3)
    x = _tokens(moe.d_model, n=16)
    with torch.no_grad():
        hidden = weights.hidden(x)  # (N, F)
        norms = torch.stack(
            [
                (hidden[:, s[s >= 0]] @ weights.w_down[:, s[s >= 0]].T).norm(dim=-1)
                for s in moe.perm
            ],
            dim=-1,
        )  # (N, E)
        chosen = moe.selector(x, moe)
    expected = torch.zeros_like(chosen).scatter_(1, norms.topk(3, dim=-1).indices, True)
    assert torch.equal(chosen, expected)
    assert chosen.sum(dim=-1).eq(3).all()


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt", "t5-gated"])
def test_oracle_forward_reuses_activations_and_equals_grouped_dispatch(name: str, fp32) -> None:
    """The oracle's shortcut (outputs from the activations it scored) vs the grouped reference."""
    moe = _moe_for(find_ffns(tiny_model(name))[0])
    moe.selector.set_topk(k=3)
    x = _tokens(moe.d_model, n=16)
    with torch.no_grad():
        mask = moe.selector(x, moe)  # (N, E) the oracle's choice, scored the plain way
        reference = moe._forward_grouped(x, mask)
        moe.reset_tally()
        torch.testing.assert_close(moe(x), reference, **fp32)
    assert moe.selection_counts.sum() == 16 * 3
    assert moe.selection_counts.tolist() == mask.sum(dim=0).tolist()


def test_given_selection_forms_and_one_shot() -> None:
    site = find_ffns(tiny_model("gpt2"))[0]
    moe = _moe_for(site)
    moe.selector.set_topk(k=2)
    x = _tokens(moe.d_model, n=6).reshape(2, 3, -1)
    index = torch.tensor([0, 3]).expand(2, 3, 2)
    mask = torch.zeros(2, 3, 8, dtype=torch.bool)
    mask[..., [0, 3]] = True
    with torch.no_grad():
        moe.select_next(index)
        by_index = moe(x)
        moe.select_next(mask)
        by_mask = moe(x)
        by_oracle = moe(x)  # the given selection was used once only
    assert torch.equal(by_index, by_mask)
    assert not torch.equal(by_mask, by_oracle)
    with pytest.raises(MoefyError):
        moe.select_next(torch.zeros(5, 8, dtype=torch.bool))
        moe(x)
    with pytest.raises(MoefyError):
        moe.select_next(torch.full((2, 3, 1), 8))
        moe(x)


def test_topk_out_of_range_raises() -> None:
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=8, method="random"))
    for bad in (
        {"k": 0},
        {"k": 9},
        {"fraction": 0.0},
        {"fraction": 1.5},
        {"k": 2, "fraction": 0.5},
    ):
        with pytest.raises(MoefyError):
            set_selection(model, **bad)
    assert set_selection(model, fraction=0.25) == 2
    assert all(m.selector.num_selected() == 2 for m in moe_layers(model))
    with pytest.raises(MoefyError):
        OracleSelector(8, k=True)


def test_layout_is_expert_major_and_contiguous() -> None:
    site = find_ffns(tiny_model("llama"))[0]
    weights = site.weights()
    moe = _moe_for(site)
    S = moe.expert_size
    assert moe.w_in.shape == (8, 2 * S, moe.d_model) and moe.w_in.is_contiguous()
    assert moe.w_out.shape == (8, S, moe.d_model) and moe.w_out.is_contiguous()
    neurons = moe.perm[3]
    assert torch.equal(moe.w_in[3, :S], weights.w_gate[neurons])
    assert torch.equal(moe.w_in[3, S:], weights.w_up[neurons])
    assert torch.equal(moe.w_out[3], weights.w_down[:, neurons].T)
    assert torch.equal(moe.b_in[3, S:], weights.b_up[neurons])
    keys = set(moe.state_dict())
    assert {"w_in", "w_out", "b_in", "b_out", "perm"} <= keys
    assert "selection_counts" not in keys and "tokens_seen" not in keys


def test_padding_slots_are_zero() -> None:
    site = find_ffns(tiny_model("gpt2"))[0]
    moe = _moe_for(site, num_experts=10)  # 64 neurons in 10 x 7 slots
    padding = moe.perm < 0
    assert int(padding.sum()) == 6
    assert moe.w_in[padding].abs().sum() == 0 and moe.w_out[padding].abs().sum() == 0
