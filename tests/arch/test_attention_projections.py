"""Attention projection paths live in the one architecture table (``FFNSpec``)."""

from __future__ import annotations

import pytest
from torch import nn

from moefy.arch import (
    ARCHITECTURES,
    FFNSpec,
    attention_projection_paths,
    find_ffns,
    register_architecture,
    register_attention_projections,
)
from moefy.errors import MoefyError
from tiny_models import tiny_model

LLAMA = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
EXPECTED = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma2": LLAMA,
    "phi3": ("self_attn.qkv_proj", "self_attn.o_proj"),
    "gpt2": ("attn.c_attn", "attn.c_proj"),
    "opt": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    "bert": (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_architecture_names_projections_that_exist(name):
    model = tiny_model(name)
    for site in find_ffns(model):
        paths = attention_projection_paths(model, site.block)
        assert paths == EXPECTED[name]
        for path in paths:
            assert isinstance(site.block.get_submodule(path), nn.Module)


def test_t5_decoder_blocks_add_cross_attention():
    model = tiny_model("t5")
    counts = {len(attention_projection_paths(model, site.block)) for site in find_ffns(model)}
    assert counts == {4, 8}  # encoder: self-attention; decoder: self and cross
    for site in find_ffns(model):
        for path in attention_projection_paths(model, site.block):
            site.block.get_submodule(path)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq, self.wo = nn.Linear(4, 4), nn.Linear(4, 4)
        self.ffn = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])


@pytest.fixture
def custom():
    register_architecture("_Net", FFNSpec(stacks=(("layers", "ffn"),), up="0", down="2", act="1"))
    yield _Net()
    ARCHITECTURES.pop("_Net")


def test_an_architecture_without_projections_says_how_to_register(custom):
    with pytest.raises(MoefyError, match="attention_projections=") as info:
        attention_projection_paths(custom, custom.layers[0])
    assert "\n" not in str(info.value)


def test_register_attention_projections_sets_the_spec_field(custom):
    register_attention_projections("_Net", ("wq", "wo"))
    assert ARCHITECTURES["_Net"].attention_projections == ("wq", "wo")
    assert attention_projection_paths(custom, custom.layers[0]) == ("wq", "wo")
    with pytest.raises(MoefyError, match="overwrite=True"):
        register_attention_projections("_Net", ("wo",))
    register_attention_projections("_Net", lambda block: ("wo",), overwrite=True)
    assert attention_projection_paths(custom, custom.layers[1]) == ("wo",)


def test_projections_of_an_unknown_architecture_say_register_it_first():
    with pytest.raises(MoefyError, match="register_architecture"):
        register_attention_projections("_Nowhere", ("q",))


def test_sparsify_offers_the_arch_function():
    import moefy.sparsify

    assert moefy.sparsify.register_attention_projections is register_attention_projections
