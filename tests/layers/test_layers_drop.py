"""Dropping attention sublayers, MLPs and blocks: identity, references, KV cache, errors."""

from __future__ import annotations

import pytest
import torch
from layer_refs import TOLERANCE, greedy, logits, zeroed

from moefy.arch import find_ffns
from moefy.errors import MoefyError
from moefy.layers import (
    DroppedAttention,
    DroppedBlock,
    DroppedMLP,
    drop_layers_,
    dropped_layers,
    restore_layers,
)
from moefy.layers.modules import EmptyCacheLayer, empty_cache_layer_class
from tiny_models import CAUSAL_ARCH_NAMES, tiny_inputs, tiny_model

FP32 = TOLERANCE[torch.float32]
# transformers' DummyLayer (5.23 and later) or moefy's stand-in for earlier versions
DummyLayer = empty_cache_layer_class()


def _module_types(model):
    return [(name, type(module)) for name, module in model.named_modules()]


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt"])
def test_dropping_nothing_is_identity(name):
    model = tiny_model(name)
    inputs = tiny_inputs(name)
    before, types = logits(model, inputs), _module_types(model)
    config = drop_layers_(model)
    assert config.is_empty
    assert _module_types(model) == types
    torch.testing.assert_close(logits(model, inputs), before, rtol=0, atol=0)


# (what to drop, the zeroed reference of the same model)
CASES = {
    "attention-0": (dict(attention=[0]), dict(attention=(0,))),
    "attention-1": (dict(attention=[1]), dict(attention=(1,))),
    "mlp-0": (dict(mlp=[0]), dict(mlp=(0,))),
    "block-0": (dict(blocks=[0]), dict(attention=(0,), mlp=(0,))),
    "attention-0-mlp-1": (dict(attention=[0], mlp=[1]), dict(attention=(0,), mlp=(1,))),
}


# every case on Llama; block 0's attention (the hard case for the cache) on every architecture
GENERATION_CASES = [("llama", case) for case in CASES] + [
    (name, case)
    for name in CAUSAL_ARCH_NAMES
    if name != "llama"
    for case in ("attention-0", "block-0")
]


def _check_generates_like_the_zeroed_reference(name, case, **generate_kwargs):
    """Drop ``case`` from ``tiny_model(name)``, check greedy decoding against the same model with
    those parts zeroed, and return (the dropped model, its input ids)."""
    drop, reference = CASES[case]
    model = tiny_model(name)
    input_ids = tiny_inputs(name)["input_ids"]
    with zeroed(model, **reference):
        ref_tokens, ref_logits = greedy(model, input_ids, **generate_kwargs)
    drop_layers_(model, **drop)
    tokens, step_logits = greedy(model, input_ids, **generate_kwargs)
    # Per-step logits catch wrong positions or masks in the cached decode steps (block 0's
    # attention gone: the cache must not read its length from an empty slot 0).
    torch.testing.assert_close(step_logits, ref_logits, **FP32)
    assert torch.equal(tokens, ref_tokens)
    return model, input_ids


@pytest.mark.parametrize(("name", "case"), GENERATION_CASES)
def test_dropped_model_generates_like_the_zeroed_reference(name, case):
    _check_generates_like_the_zeroed_reference(name, case)


@pytest.mark.parametrize("name", CAUSAL_ARCH_NAMES)
def test_kv_cache_has_no_entries_for_dropped_attention(name):
    model = tiny_model(name)
    input_ids = tiny_inputs(name)["input_ids"]  # (2, 12)
    drop_layers_(model, attention=[0])
    with torch.no_grad():
        cache = model(input_ids=input_ids, use_cache=True).past_key_values
        assert isinstance(cache.layers[0], DummyLayer) and cache.layers[0].keys is None
        assert cache.layers[1].keys.shape[-2] == input_ids.shape[1]
        assert cache.get_seq_length() == input_ids.shape[1]
        step = model(input_ids=input_ids[:, :1], past_key_values=cache, use_cache=True)
    cache = step.past_key_values
    assert isinstance(cache.layers[0], DummyLayer)
    assert cache.layers[1].keys.shape[-2] == input_ids.shape[1] + 1


def test_dropped_block_keeps_no_cache_and_lazy_caches_work():
    from transformers import DynamicCache

    model = tiny_model("llama")
    input_ids = tiny_inputs("llama")["input_ids"]
    drop_layers_(model, blocks=[0])
    assert isinstance(model.model.layers[0], DroppedBlock)
    cache = DynamicCache()  # no config: layers are appended lazily
    with torch.no_grad():
        model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    assert isinstance(cache.layers[0], DummyLayer)
    assert cache.get_seq_length() == input_ids.shape[1]


@pytest.mark.parametrize("name", ["llama", "gpt2", "gpt_neox", "opt", "gemma2"])
def test_restore_gives_back_the_dense_model(name):
    model = tiny_model(name)
    inputs = tiny_inputs(name)
    dense, types = logits(model, inputs), _module_types(model)
    drop_layers_(model, attention=[1], mlp=[0])
    drop_layers_(model, blocks=[1])  # a block whose attention was dropped already
    assert dropped_layers(model).indices() == {"attention": (1,), "mlp": (0,), "blocks": (1,)}
    assert not torch.allclose(logits(model, inputs), dense)
    restore_layers(model, blocks=[1])
    assert dropped_layers(model).blocks == ()
    restore_layers(model)
    assert dropped_layers(model).is_empty
    assert _module_types(model) == types
    torch.testing.assert_close(logits(model, inputs), dense, rtol=0, atol=0)


def test_stand_ins_are_in_place_and_free_weights_when_asked():
    model = tiny_model("llama")
    dense_params = sum(p.numel() for p in model.parameters())
    drop_layers_(model, attention=[0], mlp=[1], keep_weights=False)
    layers = model.model.layers
    assert isinstance(layers[0].self_attn, DroppedAttention)
    assert isinstance(layers[1].mlp, DroppedMLP)
    dense_layers = tiny_model("llama").model.layers
    freed = sum(p.numel() for p in dense_layers[0].self_attn.parameters()) + sum(
        p.numel() for p in dense_layers[1].mlp.parameters()
    )
    assert sum(p.numel() for p in model.parameters()) == dense_params - freed
    assert not dropped_layers(model).keep_weights
    with pytest.raises(MoefyError, match="keep_weights=False"):
        restore_layers(model)
    with pytest.raises(MoefyError, match="keep_weights"):
        drop_layers_(model, mlp=[0])  # keep_weights=True by default: a mix is refused
    drop_layers_(model, mlp=[0], keep_weights=False)
    assert isinstance(layers[0].mlp, DroppedMLP)


def test_opt_inline_mlp_is_dropped_in_all_its_slots():
    model = tiny_model("opt")
    drop_layers_(model, mlp=[0])
    block = model.model.decoder.layers[0]
    assert isinstance(block.fc1, DroppedMLP)
    assert isinstance(block.fc2, torch.nn.Identity)
    assert isinstance(block.activation_fn, torch.nn.Identity)


@pytest.mark.parametrize(
    ("drop", "pattern"),
    [
        (dict(attention=[2]), "out of range"),
        (dict(mlp=[0, 7]), "mlp layer 7 is out of range"),
        (dict(blocks=[0, 1]), "drop all 2 blocks"),
        (dict(attention=[0, 1], mlp=[0, 1]), "drop all 2 blocks"),
        (dict(attention=[0, 1]), "all 2 attention layers"),
        (dict(attention=[0], blocks=[1]), "all 2 attention layers"),
        (dict(attention=[-1]), "integers >= 0"),
        (dict(attention=[True]), "integers >= 0"),
    ],
)
def test_user_mistakes_are_refused_without_change(drop, pattern):
    model = tiny_model("llama")
    types = _module_types(model)
    with pytest.raises(MoefyError, match=pattern):
        drop_layers_(model, **drop)
    assert _module_types(model) == types


def test_errors_take_earlier_drops_into_account():
    model = tiny_model("llama")
    drop_layers_(model, attention=[0])
    with pytest.raises(MoefyError, match="all 2 attention layers"):
        drop_layers_(model, attention=[1])


def test_ffn_verbs_refuse_dropped_mlps_with_a_clear_message():
    model = tiny_model("llama")
    drop_layers_(model, attention=[0])
    assert len(find_ffns(model)) == 2  # attention drops leave every FFN in place
    drop_layers_(model, mlp=[1])
    with pytest.raises(MoefyError, match="dropped by drop_layers_"):
        find_ffns(model)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("stand_in", ["transformers", "moefy"])
@pytest.mark.parametrize("case", ["attention-0", "block-0"])
def test_empty_cache_slot_generates_like_the_zeroed_reference(case, stand_in, cache, monkeypatch):
    # transformers before 5.23 has no DummyLayer: moefy's EmptyCacheLayer takes the slot there
    if stand_in == "moefy":
        monkeypatch.setattr("moefy.layers.modules.empty_cache_layer_class", lambda: EmptyCacheLayer)
    options = {"cache_implementation": cache} if cache == "static" else {}
    model, input_ids = _check_generates_like_the_zeroed_reference("llama", case, **options)
    with torch.no_grad():
        cache = model(input_ids=input_ids, use_cache=True).past_key_values
    expected = EmptyCacheLayer if stand_in == "moefy" else DummyLayer
    assert isinstance(cache.layers[0], expected) and cache.get_seq_length() == input_ids.shape[1]
