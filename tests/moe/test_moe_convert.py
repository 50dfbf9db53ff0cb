"""moefy_ / unmoefy: exact round trips, layer filters, profiles, and refusals."""

from __future__ import annotations

import pytest
import torch

from moefy.arch import find_ffns
from moefy.errors import MoefyError
from moefy.moe import MoEFFN, MoEfyConfig, moe_layers, moefy_, set_selection, unmoefy
from moefy.moe.convert import model_fingerprint
from tiny_models import ARCH_NAMES, tiny_inputs, tiny_model


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_moefy_then_unmoefy_is_bit_identical(name: str, run) -> None:
    model = tiny_model(name)
    inputs = tiny_inputs(name)
    dense = run(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moefy_(model, MoEfyConfig(num_experts=10, method="random"))  # padded layout
    set_selection(model, k=3)
    assert not torch.equal(run(model, inputs), dense)
    unmoefy(model)
    assert not moe_layers(model)
    assert torch.equal(run(model, inputs), dense)
    restored = model.state_dict()
    assert restored.keys() == state.keys()
    assert all(torch.equal(restored[k], v) for k, v in state.items())


def test_filter_converts_only_accepted_layers() -> None:
    model = tiny_model("gpt_neox")
    moefy_(model, MoEfyConfig(num_experts=4), filter_fn=lambda site: site.index == 1)
    layers = moe_layers(model)
    assert [m.layer_index for m in layers] == [1]
    assert not isinstance(model.gpt_neox.layers[0].mlp, MoEFFN)
    with pytest.raises(MoefyError, match="accepted no"):
        moefy_(tiny_model("gpt_neox"), MoEfyConfig(num_experts=4), filter_fn=lambda s: False)


def test_refuses_twice_and_unmoefy_of_dense() -> None:
    model = tiny_model("opt")
    moefy_(model, MoEfyConfig(num_experts=4))
    with pytest.raises(MoefyError, match="already"):
        moefy_(model, MoEfyConfig(num_experts=4))
    unmoefy(model)
    with pytest.raises(MoefyError, match="no MoE"):
        unmoefy(model)


def test_bad_layout_leaves_model_untouched() -> None:
    model = tiny_model("llama")
    with pytest.raises(MoefyError, match="pad"):
        moefy_(model, MoEfyConfig(num_experts=60))  # d_ff=64: 56 zero neurons
    with pytest.raises(MoefyError, match="exceeds"):
        moefy_(model, MoEfyConfig(num_experts=65))
    assert not moe_layers(model)


def _profile_for(model, fake_profile, seed: int = 0):
    fingerprint = model_fingerprint(model)
    gen = torch.Generator().manual_seed(seed)
    counts = []
    for d_ff in fingerprint["d_ff"]:
        active = torch.rand(200, d_ff, generator=gen) < 0.3
        counts.append((active.float().T @ active.float()).long())
    return fake_profile(fingerprint, counts)


def test_coactivation_uses_profile(run, fp32, fake_profile) -> None:
    model = tiny_model("qwen2")
    inputs = tiny_inputs("qwen2")
    dense = run(model, inputs)
    with pytest.raises(MoefyError, match="profile"):
        moefy_(model, MoEfyConfig(num_experts=8, method="coactivation"))
    profile = _profile_for(model, fake_profile)
    moefy_(model, MoEfyConfig(num_experts=8, method="coactivation"), profile=profile)
    assert len(moe_layers(model)) == 2
    torch.testing.assert_close(run(model, inputs), dense, **fp32)


@pytest.mark.parametrize(
    "change",
    [
        {"model_type": "mistral"},
        {"num_layers": 3},
        {"d_model": 48},
        {"d_ff": [64, 128]},
    ],
)
def test_profile_from_another_model_is_refused(change: dict, fake_profile) -> None:
    model = tiny_model("qwen2")
    profile = _profile_for(model, fake_profile)
    profile.fingerprint = {**profile.fingerprint, **change}
    with pytest.raises(MoefyError, match="another model"):
        moefy_(model, MoEfyConfig(num_experts=8, method="coactivation"), profile=profile)
    assert not moe_layers(model)


def test_sites_keep_their_place_for_inline_ffns() -> None:
    model = tiny_model("bert")
    moefy_(model, MoEfyConfig(num_experts=4))
    layer = model.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, MoEFFN)
    assert isinstance(layer.output.dense, torch.nn.Identity)
    unmoefy(model)
    assert isinstance(layer.output.dense, torch.nn.Linear)
    assert len(find_ffns(model)) == 2


def test_dense_skeleton_holds_no_weights() -> None:
    model = tiny_model("phi3")
    moefy_(model, MoEfyConfig(num_experts=4))
    for moe in moe_layers(model):
        params = [p for m in moe._dense_skeleton.values() for p in m.parameters()]
        assert params and all(p.is_meta for p in params)
        assert not any(k.startswith("_dense") for k in moe.state_dict())


def test_frozen_dense_weights_give_frozen_experts() -> None:
    model = tiny_model("gpt2").requires_grad_(False)
    moefy_(model, MoEfyConfig(num_experts=4))
    assert not any(p.requires_grad for m in moe_layers(model) for p in m.parameters())


def test_unmoefy_follows_a_dtype_change(run) -> None:
    model = tiny_model("gpt2")
    inputs = tiny_inputs("gpt2")
    moefy_(model, MoEfyConfig(num_experts=4))
    model.to(torch.float64)
    expected = run(model, inputs)
    unmoefy(model)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    torch.testing.assert_close(run(model, inputs), expected)
