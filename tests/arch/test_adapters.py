"""The FFN adapters: every supported architecture's FFN recomputed through the canonical view."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moefy.arch import (
    ARCHITECTURES,
    FFNSpec,
    find_ffns,
    get_spec,
    register_architecture,
    replace_ffn,
    restore_ffn,
)
from moefy.errors import MoefyError
from tiny_models import ARCH_NAMES, tiny_inputs, tiny_model

EXPECTED_LAYERS = {name: 2 for name in ARCH_NAMES} | {"t5": 4, "t5-gated": 4}
GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "t5-gated"}


def _capture_ffn_io(model, sites, inputs):
    """Run ``model`` and record each FFN's input x and output y with hooks."""
    seen: dict[int, dict[str, torch.Tensor]] = {s.index: {} for s in sites}
    handles = []
    for site in sites:
        handles.append(
            site.input_module.register_forward_pre_hook(
                lambda _m, args, i=site.index: seen[i].__setitem__("x", args[0])
            )
        )
        handles.append(
            site.output_module.register_forward_hook(
                lambda _m, _a, out, i=site.index: seen[i].__setitem__("y", out)
            )
        )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_canonical_view_recomputes_every_ffn(name):
    model = tiny_model(name)
    sites = find_ffns(model)
    assert len(sites) == EXPECTED_LAYERS[name]
    assert [s.index for s in sites] == list(range(len(sites)))
    seen = _capture_ffn_io(model, sites, tiny_inputs(name))
    for site in sites:
        weights = site.weights()
        assert weights.gated == (name in GATED)
        assert weights.w_up.shape == (64, 32) and weights.w_down.shape == (32, 64)
        with torch.no_grad():
            torch.testing.assert_close(weights(seen[site.index]["x"]), seen[site.index]["y"])


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt", "bert", "t5"])
def test_weights_are_views_not_copies(name):
    model = tiny_model(name)
    site = find_ffns(model)[0]
    weights = site.weights()
    with torch.no_grad():
        weights.w_down.mul_(0.0)
    assert torch.count_nonzero(site.part("down").weight) == 0


def test_biases_reach_the_view():
    weights = find_ffns(tiny_model("gpt2"))[0].weights()
    assert weights.b_up is not None and weights.b_down is not None
    assert weights.b_up.abs().sum() > 0


def test_neuron_norms_match_columns():
    weights = find_ffns(tiny_model("llama"))[0].weights()
    expected = torch.stack([weights.w_down[:, i].norm() for i in range(weights.d_ff)])
    torch.testing.assert_close(weights.neuron_norms(), expected)


class _Swap(nn.Module):
    """Stands in for an FFN replacement: computes the FFN through the canonical view."""

    def __init__(self, site):
        super().__init__()
        self.weights = site.weights()

    def forward(self, x):
        return self.weights(x)


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt", "bert", "t5", "phi3"])
def test_replace_and_restore_keep_outputs(name):
    model = tiny_model(name)
    inputs = tiny_inputs(name)
    with torch.no_grad():
        reference = model(**inputs)[0]
    sites = find_ffns(model)
    replaced = [replace_ffn(model, site, _Swap(site)) for site in sites]
    with torch.no_grad():
        swapped = model(**inputs)[0]
    torch.testing.assert_close(swapped, reference)
    for site, old in zip(sites, replaced, strict=True):
        restore_ffn(model, site, old)
    assert [s.name for s in find_ffns(model)] == [s.name for s in sites]
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs)[0], reference)


class _CustomBlock(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.ffn = nn.ModuleDict({"w1": nn.Linear(d, f), "w2": nn.Linear(f, d), "act": nn.ReLU()})

    def forward(self, x):
        h = self.ffn["act"](self.ffn["w1"](self.norm(x)))
        return x + self.ffn["w2"](h)


class CustomNet(nn.Module):
    """A plain torch model with no HF config: keyed by its class name."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_CustomBlock(16, 48) for _ in range(3)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_unregistered_architecture_names_what_to_register():
    with pytest.raises(
        MoefyError, match=r"unsupported architecture 'CustomNet'.*register_architecture"
    ):
        get_spec(CustomNet())


def test_registered_custom_architecture_works():
    spec = FFNSpec(stacks=(("blocks", "ffn"),), up="w1", down="w2", act="act")
    register_architecture("CustomNet", spec)
    try:
        model = CustomNet().eval()
        sites = find_ffns(model)
        assert len(sites) == 3
        x = torch.randn(2, 5, 16)
        seen = _capture_ffn_io(model, sites, {"x": x})
        for site in sites:
            torch.testing.assert_close(site.weights()(seen[site.index]["x"]), seen[site.index]["y"])
        with pytest.raises(MoefyError, match="registered already"):
            register_architecture("CustomNet", spec)
    finally:
        ARCHITECTURES.pop("CustomNet")


def test_spec_that_does_not_match_the_model_is_a_clear_error():
    spec = FFNSpec(stacks=(("layers", "mlp"),), up="up", down="down", act="act")
    with pytest.raises(MoefyError, match="does not match"):
        find_ffns(CustomNet(), spec=spec)
    spec = FFNSpec(stacks=(("blocks", "ffn"),), up="nope", down="w2", act="act")
    with pytest.raises(MoefyError, match="does not match"):
        find_ffns(CustomNet(), spec=spec)


def test_bad_spec_is_rejected():
    with pytest.raises(MoefyError):
        FFNSpec(stacks=(), up="a", down="b", act="c")
    with pytest.raises(MoefyError):
        FFNSpec(stacks=(("a", "b"),), up="a", down="b", act="c", gate="g", fused_gate_up=True)
