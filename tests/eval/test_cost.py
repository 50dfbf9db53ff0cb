"""FLOPs accounting against hand computations on tiny models: dense, moefied, top-k sparsified."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moefy.errors import MoefyError
from moefy.eval.cost import measure_cost
from moefy.moe import MoEfyConfig, moefy_, set_selection
from moefy.sparsify import TopKConfig, sparsify_
from tiny_models import D, F, tiny_inputs, tiny_model

LAYERS = 2
# tiny llama (mlp_bias=True), per token and layer, counted by hand:
# gate 2DF + F, up 2DF + F, activation and gating product 2F, down 2FD + D
DENSE_FFN_LAYER = (2 * D * F + F) * 2 + 2 * F + (2 * F * D + D)


def _other_flops_by_hand(model: nn.Module) -> float:
    """2 I O + O for every Linear outside the MLPs (attention projections and the LM head)."""
    total = 0.0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".mlp." not in name:
            out_f, in_f = module.weight.shape
            total += 2 * in_f * out_f + (out_f if module.bias is not None else 0)
    return total


def _run(model, inputs):
    with torch.no_grad(), measure_cost(model) as meter:
        model(**inputs)
        meter.add_tokens(inputs["input_ids"].numel())
    return meter.result()


def test_dense_llama_matches_hand_count():
    model = tiny_model("llama")
    assert DENSE_FFN_LAYER == 12576  # the formula above, spelled out once
    cost = _run(model, tiny_inputs("llama"))
    assert cost.ffn_flops_per_token == LAYERS * DENSE_FFN_LAYER
    assert cost.other_flops_per_token == pytest.approx(_other_flops_by_hand(model))
    params_read = cost.total_flops_per_token / 2  # one weight per multiply-add
    assert cost.weight_bytes_per_token == pytest.approx(params_read * 4)
    assert cost.tokens == tiny_inputs("llama")["input_ids"].numel()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_moefied_llama_counts_the_selected_experts(k):
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=4))
    set_selection(model, k=k)
    cost = _run(model, tiny_inputs("llama"))
    neurons = k * F // 4
    # per neuron: 3 projections of 2D, two input biases, activation, gating product
    per_layer = neurons * (2 * D * 3 + 2 + 1 + 1) + D
    assert cost.ffn_flops_per_token == pytest.approx(LAYERS * per_layer)
    if k == 4:
        assert cost.ffn_flops_per_token == pytest.approx(LAYERS * DENSE_FFN_LAYER)
    assert cost.other_flops_per_token == pytest.approx(_other_flops_by_hand(model))


def test_topk_sparsified_llama_takes_off_the_skipped_down_columns():
    model = tiny_model("llama")
    sparsify_(model, TopKConfig(sparsity=0.75))
    inputs = tiny_inputs("llama")
    nonzero = []
    downs = [m.mlp.down_proj.base_layer for m in model.model.layers]
    hooks = [
        d.register_forward_pre_hook(lambda _m, args: nonzero.append(int((args[0] != 0).sum())))
        for d in downs
    ]
    cost = _run(model, inputs)
    for h in hooks:
        h.remove()
    tokens = inputs["input_ids"].numel()
    # gate and up run in full; down reads D weights per non-zero activation
    full_part = (2 * D * F + F) * 2 + 2 * F + D
    by_hand = LAYERS * full_part + 2 * D * sum(nonzero) / tokens
    assert cost.ffn_flops_per_token == pytest.approx(by_hand)
    assert sum(nonzero) == LAYERS * tokens * (F - round(0.75 * F))


def test_no_tokens_is_an_error():
    model = tiny_model("llama")
    with pytest.raises(MoefyError, match="no tokens"), measure_cost(model) as meter:
        meter.result()


def _attention_flops_by_hand(model: nn.Module) -> float:
    """2 I O + O for every Linear of the attention blocks (the LM head left out)."""
    total = 0.0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".self_attn." in name:
            out_f, in_f = module.weight.shape
            total += 2 * in_f * out_f + (out_f if module.bias is not None else 0)
    return total


def test_attention_flops_are_the_block_linears_outside_the_ffn():
    model = tiny_model("llama")
    cost = _run(model, tiny_inputs("llama"))
    assert cost.attention_flops_per_token == pytest.approx(_attention_flops_by_hand(model))
    assert 0 < cost.attention_flops_per_token < cost.other_flops_per_token  # the head is other
    assert cost.block_linear_flops_per_token == pytest.approx(
        cost.ffn_flops_per_token + cost.attention_flops_per_token
    )


def test_sparsified_attention_lowers_the_attention_flops():
    from moefy.data.blocks import TokenBlocks
    from moefy.sparsify import TEALConfig
    from tiny_models import VOCAB

    model = tiny_model("llama")
    dense = _run(model, tiny_inputs("llama"))
    gen = torch.Generator().manual_seed(0)
    blocks = TokenBlocks(torch.randint(3, VOCAB, (8, 16), generator=gen))
    config = TEALConfig(sparsity=0.5, attention=True, greedy=False, min_calibration_tokens=1)
    sparsify_(model, config, blocks)
    sparse = _run(model, tiny_inputs("llama"))
    assert sparse.attention_flops_per_token < 0.8 * dense.attention_flops_per_token
    assert sparse.other_flops_per_token - sparse.attention_flops_per_token == pytest.approx(
        dense.other_flops_per_token - dense.attention_flops_per_token
    )
