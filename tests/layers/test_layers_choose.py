"""Choosing layers (most redundant, Unified Layer Skipping), the sweep entry point, and
composition with MoEfication and thresholds."""

from __future__ import annotations

import pytest
import torch
from layer_refs import TOLERANCE, logits

from moefy.data.blocks import TokenBlocks
from moefy.errors import MoefyError
from moefy.layers import (
    LAYER_METHODS,
    DropConfig,
    LayerImportance,
    LayerImportanceConfig,
    LayerScores,
    apply_layer_method,
    blocks_for_speedup,
    drop_layers_,
    dropped_layers,
    layer_importance,
    plan_uniform_skip,
    restore_layers,
)
from moefy.moe import MoEfyConfig, moefy_, unmoefy
from moefy.sparsify import TopKConfig, sparsify_, unsparsify
from tiny_models import tiny_inputs, tiny_model

FP32 = TOLERANCE[torch.float32]


def test_uniform_skip_spreads_blocks_through_the_middle():
    assert plan_uniform_skip(30, 4).blocks == (4, 11, 18, 25)
    assert plan_uniform_skip(30, 28).blocks == tuple(range(1, 29))
    assert plan_uniform_skip(30, 0).is_empty
    assert plan_uniform_skip(6, 1).blocks == (3,)
    with pytest.raises(MoefyError, match="first and last"):
        plan_uniform_skip(30, 29)
    with pytest.raises(MoefyError, match="first and last"):
        plan_uniform_skip(2, 1)


def test_blocks_for_speedup():
    assert blocks_for_speedup(30, 1.0) == 0
    assert blocks_for_speedup(30, 1.5) == 10
    assert blocks_for_speedup(30, 2.0) == 15
    with pytest.raises(MoefyError, match=">= 1"):
        blocks_for_speedup(30, 0.5)


def _importance(model, similarities) -> LayerImportance:
    rows = tuple(
        LayerScores(i, f"layer{i}", *similarity) for i, similarity in enumerate(similarities)
    )
    return LayerImportance(rows, 10, None, "llama", LayerImportanceConfig())


def _four_block_llama():
    import transformers as T

    from tiny_models import _DEC

    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(**{**_DEC, "num_hidden_layers": 4})).eval()


def test_apply_layer_method_drops_the_most_redundant():
    model = _four_block_llama()
    importance = _importance(
        model, [(0.1, 0.9, 0.2), (0.8, 0.3, 0.6), (0.9, 0.2, 0.7), (0.5, 0.95, 0.4)]
    )
    assert apply_layer_method(model, "drop-attn", 2, importance).attention == (1, 2)
    restore_layers(model)
    assert apply_layer_method(model, "drop-mlp", 1, importance).mlp == (3,)
    restore_layers(model)
    assert apply_layer_method(model, "drop-block", 1, importance).blocks == (2,)
    restore_layers(model)
    assert apply_layer_method(model, "skip", 2).blocks == (1, 2)
    restore_layers(model)
    assert apply_layer_method(model, "drop-attn", 0, importance).is_empty
    assert set(LAYER_METHODS) == {"drop-attn", "drop-mlp", "drop-block", "skip"}


def test_apply_layer_method_mistakes():
    model = tiny_model("llama")
    with pytest.raises(MoefyError, match="unknown layer method"):
        apply_layer_method(model, "drop-heads", 1)
    with pytest.raises(MoefyError, match="importance="):
        apply_layer_method(model, "drop-attn", 1)
    with pytest.raises(MoefyError, match="cover 4 blocks"):
        apply_layer_method(model, "drop-attn", 1, _importance(model, [(0.5, 0.5, 0.5)] * 4))
    with pytest.raises(MoefyError, match="all 2 attention layers"):
        apply_layer_method(model, "drop-attn", 2, _importance(model, [(0.5, 0.5, 0.5)] * 2))


def test_measured_importance_drives_the_drop():
    model = _four_block_llama()
    data = TokenBlocks(torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1)))
    importance = layer_importance(model, data)
    ranked = sorted(range(4), key=lambda i: -importance.layers[i].block_similarity)
    dropped = apply_layer_method(model, "drop-block", 2, importance)
    assert dropped.blocks == tuple(sorted(ranked[:2]))
    restore_layers(model)
    # the sweep passes calibration text instead of scores: the same choice
    assert apply_layer_method(model, "drop-block", 2, calibration=data) == dropped


def _moefy_config():
    return MoEfyConfig(num_experts=4, method="random")


def test_dropped_model_can_be_moefied_and_back():
    model = tiny_model("llama")
    inputs = tiny_inputs("llama")
    drop_layers_(model, attention=[0])
    dropped = logits(model, inputs)
    moefy_(model, _moefy_config())  # every expert runs: computes what the dropped model did
    torch.testing.assert_close(logits(model, inputs), dropped, **FP32)
    unmoefy(model)
    torch.testing.assert_close(logits(model, inputs), dropped, **FP32)


@pytest.mark.parametrize("drop", [dict(mlp=[1]), dict(blocks=[1]), dict(attention=[1])])
def test_moefied_model_can_be_dropped_and_restored(drop):
    model = tiny_model("llama")
    inputs = tiny_inputs("llama")
    moefy_(model, _moefy_config())
    moefied = logits(model, inputs)
    reference = tiny_model("llama")
    drop_layers_(reference, **drop)
    drop_layers_(model, **drop)
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), **FP32)
    restore_layers(model)
    torch.testing.assert_close(logits(model, inputs), moefied, **FP32)
    unmoefy(model)  # the MoE layers are still in place and whole


def test_thresholds_compose_with_dropping():
    model = tiny_model("llama")
    inputs = tiny_inputs("llama")
    drop_layers_(model, attention=[1])
    sparsify_(model, TopKConfig(sparsity=0.5))
    both = logits(model, inputs)
    unsparsify(model)
    sparsify_(model, TopKConfig(sparsity=0.5))
    torch.testing.assert_close(logits(model, inputs), both, **FP32)
    drop_layers_(model, blocks=[1])  # dropping a block of a sparsified model
    assert dropped_layers(model) == DropConfig(attention=[1], blocks=[1])
    assert not torch.allclose(logits(model, inputs), both)
    restore_layers(model, blocks=[1])
    torch.testing.assert_close(logits(model, inputs), both, **FP32)


def test_layer_methods_are_a_registry_with_their_kept_blocks():
    from moefy.layers import LAYER_METHODS

    assert LAYER_METHODS.names() == ["drop-attn", "drop-mlp", "drop-block", "skip"]
    assert LAYER_METHODS.get("skip").meta["kept"] == 2  # skip keeps the first and last block
    assert LAYER_METHODS.get("drop-attn").meta["kept"] == 0
    assert all(entry.help for entry in LAYER_METHODS.entries())
    with pytest.raises(MoefyError, match="did you mean 'skip'"):
        LAYER_METHODS.get("skips")
