"""The decode benchmark's carved variant: carved, budgeted to its share of the FFN FLOPs, and
still the dense model's outputs when every expert runs."""

from __future__ import annotations

import pytest
import torch

from moefy.bench.run import BenchConfig
from moefy.bench.variants import carved_copy
from moefy.errors import MoefyError
from moefy.models.load import load_model
from moefy.moe import moe_layers
from moefy.moe.budget import allocate_experts
from tiny_models import save_tiny_hf_folder, write_word_text


def test_carved_copy_meets_its_budget_and_leaves_the_dense_model_alone(tmp_path):
    folder = save_tiny_hf_folder(tmp_path / "model")
    text = write_word_text(tmp_path / "text.jsonl", docs=80)
    dense, tokenizer = load_model(str(folder))
    ids = torch.randint(3, 100, (2, 16))
    with torch.no_grad():
        before = dense(ids).logits
    carved = carved_copy(dense, tokenizer, 0.5, str(text))
    layers = moe_layers(carved)
    assert layers and all(m.num_shared >= 1 for m in layers)
    assert not moe_layers(dense)
    spent = sum(m.flops_per_token(experts_per_token=m.selector.num_selected()) for m in layers)
    assert spent <= 0.5 * sum(m.dense_flops_per_token() for m in layers) + 1e-9
    allocate_experts(carved, None, 1.0, curves=[[0.0] * m.num_experts for m in layers])
    with torch.no_grad():
        assert torch.allclose(carved(ids).logits, before, atol=1e-5)
        assert torch.equal(dense(ids).logits, before)


def test_carved_keep_out_of_range_is_refused():
    with pytest.raises(MoefyError, match="carved keep must be in"):
        BenchConfig(carved_keep=1.5)
