"""The fast paths inside models: a moefied and a TEAL-sparsified tiny model decode the same with
the reference and cpu backends, and the C++ kernels really ran."""

from __future__ import annotations

import pytest
import torch

from moefy.kernels import cpu as cpu_kernels
from moefy.kernels import use_backend
from moefy.moe import MoEfyConfig, moefy_
from moefy.routing import attach_routers
from moefy.sparsify import TEALConfig, sparsify_
from moefy.sparsify.wrappers import sparse_modules
from tiny_models import VOCAB, tiny_inputs, tiny_model

NEW_TOKENS = 12


def _generate(model, prompt):
    with torch.no_grad():
        return model.generate(
            prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None
        )


def _spy(monkeypatch, name):
    calls = {"n": 0}
    real = getattr(cpu_kernels, name)

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_kernels, name, counted)
    return calls


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_moefied_model_generates_the_same_tokens(arch, monkeypatch):
    model = tiny_model(arch)
    moefy_(model, MoEfyConfig(num_experts=8, method="random"))
    attach_routers(model, "centroid", fraction=0.25)
    prompt = tiny_inputs(arch, batch=1, seq=6)["input_ids"]
    with use_backend("reference"):
        expected = _generate(model, prompt)
    calls = _spy(monkeypatch, "routed_expert_ffn")  # router, top-k and experts in one call
    with use_backend("cpu"):
        got = _generate(model, prompt)
    assert calls["n"] >= NEW_TOKENS  # decode steps ran the C++ kernel
    assert torch.equal(got, expected)


@pytest.mark.parametrize("router", ["centroid", "linear", "mlp"])
def test_fused_routing_equals_selector_then_kernel(router, monkeypatch):
    """Decode through the one-call path (router inside the kernel) gives the logits and the
    expert tallies of the selector's own forward followed by the expert kernel."""
    from moefy.moe import moe_layers
    from moefy.routing.routers import Router

    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=8, method="random"))
    routers = attach_routers(model, router, fraction=0.375)
    with torch.no_grad():  # untrained learned routers: give them distinct random weights
        for i, module in enumerate(routers):
            gen = torch.Generator().manual_seed(i)
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
    prompt = tiny_inputs("llama", batch=1, seq=6)["input_ids"]

    def run():
        for moe in moe_layers(model):
            moe.reset_tally()
        with use_backend("cpu"):
            tokens = _generate(model, prompt)
        return tokens, [moe.selection_counts.clone() for moe in moe_layers(model)]

    fused = _spy(monkeypatch, "routed_expert_ffn")
    got_tokens, got_counts = run()
    assert fused["n"] >= NEW_TOKENS
    monkeypatch.setattr(Router, "kernel_route", lambda self: None)
    plain = _spy(monkeypatch, "expert_ffn")
    want_tokens, want_counts = run()
    assert plain["n"] >= NEW_TOKENS
    assert torch.equal(got_tokens, want_tokens)
    for got, want in zip(got_counts, want_counts, strict=True):
        assert torch.equal(got, want)


def test_moefied_small_batch_logits_match(monkeypatch):
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=8, method="random"))
    attach_routers(model, "centroid", fraction=0.5)
    inputs = tiny_inputs("llama", batch=2, seq=7)  # 14 tokens: the small-batch path
    with torch.no_grad(), use_backend("reference"):
        expected = model(**inputs).logits
    calls = _spy(monkeypatch, "routed_expert_ffn")
    with torch.no_grad(), use_backend("cpu"):
        got = model(**inputs).logits
    assert calls["n"] > 0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_teal_model_generates_the_same_tokens_and_counts(monkeypatch):
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(3, VOCAB, (8, 16), generator=gen)
    from moefy.data.blocks import TokenBlocks

    config = TEALConfig(sparsity=0.5, greedy=False, min_calibration_tokens=1, batch_size=4)
    sparsify_(model, config, TokenBlocks(blocks))
    prompt = tiny_inputs("llama", batch=1, seq=5)["input_ids"]
    with use_backend("reference"):
        expected = _generate(model, prompt)
    reference_zeros = [int(w.zeros_seen) for _, w in sparse_modules(model)]
    for _, wrapper in sparse_modules(model):
        wrapper.reset_counters()
    calls = _spy(monkeypatch, "threshold_linear")
    with use_backend("cpu"):
        got = _generate(model, prompt)
    assert calls["n"] >= NEW_TOKENS
    assert torch.equal(got, expected)
    assert [int(w.zeros_seen) for _, w in sparse_modules(model)] == reference_zeros
    assert sum(reference_zeros) > 0
