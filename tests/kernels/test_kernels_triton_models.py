"""The Triton kernels inside models: a moefied and a TEAL-sparsified tiny model give the same
logits with the triton backend as with plain torch, and the Triton kernels really ran.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (``tests/conftest.py``).
"""

from __future__ import annotations

import pytest
import torch

from moefy.data.blocks import TokenBlocks
from moefy.kernels import use_backend
from moefy.moe import MoEfyConfig, moefy_
from moefy.routing import attach_routers
from moefy.sparsify import TEALConfig, sparsify_
from tiny_models import VOCAB, tiny_inputs, tiny_model

pytest.importorskip("triton")

from moefy.kernels import triton_kernels  # noqa: E402
from moefy.kernels.triton_launch import interpreter_active  # noqa: E402

pytestmark = pytest.mark.skipif(
    not interpreter_active(), reason="needs Triton's interpreter (no GPU: tests/conftest.py)"
)


def _spy(monkeypatch, name):
    calls = {"n": 0}
    real = getattr(triton_kernels, name)

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_kernels, name, counted)
    return calls


def _logits_both_ways(model, inputs, monkeypatch, kernel):
    with torch.no_grad(), use_backend("reference"):
        expected = model(**inputs).logits
    calls = _spy(monkeypatch, kernel)
    with torch.no_grad(), use_backend("triton"):
        got = model(**inputs).logits
    return expected, got, calls["n"]


def test_moefied_model_runs_the_triton_expert_kernel(monkeypatch):
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=8, method="random"))
    attach_routers(model, "centroid", fraction=0.5)
    inputs = tiny_inputs("llama", batch=1, seq=5)  # 5 tokens: the small-batch path
    expected, got, calls = _logits_both_ways(model, inputs, monkeypatch, "expert_ffn")
    assert calls == 2  # one per MoE layer
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_teal_model_runs_the_triton_threshold_kernel(monkeypatch):
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    blocks = TokenBlocks(torch.randint(3, VOCAB, (8, 16), generator=gen))
    sparsify_(model, TEALConfig(sparsity=0.5, greedy=False, min_calibration_tokens=1), blocks)
    inputs = tiny_inputs("llama", batch=1, seq=4)
    expected, got, calls = _logits_both_ways(model, inputs, monkeypatch, "threshold_linear")
    assert calls > 0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
