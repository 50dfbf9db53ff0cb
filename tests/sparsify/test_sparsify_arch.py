"""Every supported architecture: threshold zero is dense, sparsity works, unsparsify restores."""

from __future__ import annotations

import pytest
import torch

from moefy.errors import MoefyError
from moefy.sparsify import (
    CATSConfig,
    CHESSConfig,
    TEALConfig,
    ThresholdActivation,
    ThresholdLinear,
    TopKConfig,
    TopKLinear,
    WINAConfig,
    measure,
    sparsify_,
    unsparsify,
)
from moefy.sparsify.wrappers import sparse_modules
from tiny_models import ARCH_NAMES, tiny_inputs, tiny_model

EXACT = {"rtol": 0.0, "atol": 0.0}
GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "t5-gated"}
FAST = {"min_calibration_tokens": 1, "calibration_passes": 1, "batch_size": 4}


def _configs(name: str, sparsity: float) -> list:
    configs = [
        TopKConfig(sparsity=sparsity),
        TEALConfig(sparsity=sparsity, attention=True, greedy=False, **FAST),
        WINAConfig(sparsity=sparsity, attention=True, greedy=False, **FAST),
    ]
    if name in GATED:
        configs += [CATSConfig(sparsity=sparsity, **FAST), CHESSConfig(sparsity=sparsity, **FAST)]
    return configs


def _output(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_threshold_zero_equals_dense(name, small_blocks):
    model = tiny_model(name)
    inputs = tiny_inputs(name)
    dense = _output(model, inputs)
    for config in _configs(name, 0.0):
        sparsify_(model, config, small_blocks)
        assert next(sparse_modules(model), None) is not None
        torch.testing.assert_close(_output(model, inputs), dense, **EXACT, msg=config.method)
        unsparsify(model)


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_every_architecture_sparsifies_and_restores(name, small_blocks):
    model = tiny_model(name)
    inputs = tiny_inputs(name)
    dense = _output(model, inputs)
    modules_before = [type(m) for m in model.modules()]
    for config in _configs(name, 0.5):
        sparsify_(model, config, small_blocks)
        wrappers = [w for _, w in sparse_modules(model)]
        kinds = {type(w) for w in wrappers}
        expected = {"topk": TopKLinear, "teal": ThresholdLinear, "wina": ThresholdLinear}
        assert kinds == {expected.get(config.method, ThresholdActivation)}
        # attention projections are wrapped too for TEAL/WINA: more than the FFN's 2-3 layers
        if config.method in ("teal", "wina"):
            assert any("attn" in w.role.lower() or "attention" in w.role.lower() for w in wrappers)
        sparse = _output(model, inputs)
        assert not torch.allclose(sparse, dense)
        measured = measure(model, small_blocks)
        assert 0.3 < measured.activation_sparsity < 0.7, (
            config.method,
            measured.activation_sparsity,
        )
        assert len(measured.layers) == {"t5": 4, "t5-gated": 4}.get(name, 2)
        unsparsify(model)
        torch.testing.assert_close(_output(model, inputs), dense, **EXACT)
    assert [type(m) for m in model.modules()] == modules_before


@pytest.mark.parametrize("name", sorted(set(ARCH_NAMES) - GATED))
@pytest.mark.parametrize(
    "config", [CATSConfig(**FAST), CHESSConfig(**FAST)], ids=lambda c: c.method
)
def test_gate_methods_refuse_non_gated_ffns(name, config, small_blocks):
    model = tiny_model(name)
    with pytest.raises(MoefyError, match="no gate: use teal, wina or topk"):
        sparsify_(model, config, small_blocks)
    assert next(sparse_modules(model), None) is None  # left dense


def test_wrappers_keep_the_replaced_modules(small_blocks):
    model = tiny_model("llama")
    originals = {name: m for name, m in model.named_modules() if name.endswith(("proj",))}
    sparsify_(model, TEALConfig(sparsity=0.5, attention=True, greedy=False, **FAST), small_blocks)
    for name, wrapper in sparse_modules(model):
        assert wrapper.base_layer is originals[name]
    unsparsify(model)
    for name, module in originals.items():
        assert model.get_submodule(name) is module
