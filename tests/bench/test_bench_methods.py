"""Any registered training-free method in the decode table: specs checked early, copies
calibrated like TEAL's."""

from __future__ import annotations

import pytest
import torch

from moefy.bench import BenchConfig
from moefy.bench.variants import TEAL_CALIBRATION_TOKENS, sparsified_copy
from moefy.errors import MoefyError
from moefy.sparsify import sparsify_config_of
from moefy.sparsify.wrappers import sparse_modules
from tiny_models import tiny_inputs, tiny_model, tiny_tokenizer, write_word_text


def test_bench_config_refuses_unknown_methods_and_fields():
    with pytest.raises(MoefyError, match="unknown sparsify method"):
        BenchConfig(methods=("nosuch",))
    with pytest.raises(MoefyError, match="no field"):
        BenchConfig(methods=("teal:colour=red",))
    assert BenchConfig(methods=("wina:attention=true",)).methods == ("wina:attention=true",)


def test_sparsified_copy_applies_the_spec_and_leaves_the_model_alone(tmp_path):
    text = write_word_text(tmp_path / "text.jsonl", docs=400, words=60)
    model = tiny_model("llama")
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        before = model(**inputs).logits
    copy = sparsified_copy(model, tiny_tokenizer(), "wina:attention=true", 0.5, str(text))
    config = sparsify_config_of(copy)
    assert config.method == "wina" and config.attention and config.sparsity == 0.5
    assert config.min_calibration_tokens == TEAL_CALIBRATION_TOKENS
    roles = {w.role for _, w in sparse_modules(copy)}
    assert "self_attn.q_proj" in roles and "down_proj" in roles
    assert not list(sparse_modules(model))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
        assert not torch.equal(copy(**inputs).logits, before)
