"""StaticDecoder: greedy tokens equal transformers' generate, eager and compiled, for dense,
moefied-and-routed and TEAL-sparsified tiny models, with the C++ kernels inside the compiled
graph (no graph breaks) and the same per-layer expert tallies; its one-line errors."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from moefy.bench.decode import generate_exactly
from moefy.data.blocks import TokenBlocks
from moefy.decoding import StaticDecoder
from moefy.errors import MoefyError
from moefy.kernels import use_backend
from moefy.moe import MoEfyConfig, moe_layers, moefy_
from moefy.routing import attach_routers
from moefy.sparsify import TEALConfig, sparsify_
from tiny_models import tiny_inputs, tiny_model

NEW_TOKENS = 6


def _routed(fraction: float = 0.25):
    model = tiny_model("llama")
    moefy_(model, MoEfyConfig(num_experts=8, method="random"))
    attach_routers(model, "centroid", fraction=fraction)
    return model.eval()


def _teal():
    model = tiny_model("llama")
    blocks = TokenBlocks(tiny_inputs("llama", batch=8, seq=16, seed=1)["input_ids"])
    config = TEALConfig(sparsity=0.5, attention=True, greedy=False, min_calibration_tokens=1)
    sparsify_(model, config, blocks)
    return model.eval()


def _prompt():
    return tiny_inputs("llama", batch=1, seq=5)["input_ids"]  # (1, 5)


def _tallies(model):
    return [layer.selection_counts.clone() for layer in moe_layers(model)]


def _reset(model):
    for layer in moe_layers(model):
        layer.reset_tally()


@pytest.mark.parametrize("build", [lambda: tiny_model("llama").eval(), _routed, _teal])
def test_eager_static_decoder_equals_generate(build):
    model, prompt = build(), _prompt()
    with use_backend("cpu"):
        expected = generate_exactly(model, prompt, NEW_TOKENS)
        decoder = StaticDecoder(model, max_length=16, compile=False)
        got = decoder.generate(prompt, NEW_TOKENS)
        again = decoder.generate(prompt, NEW_TOKENS)  # the cache is reset between calls
    assert torch.equal(got, expected)
    assert torch.equal(again, expected)


@pytest.mark.parametrize("kind", ["dense", "routed", "teal"])
def test_compiled_step_equals_eager_without_graph_breaks(kind):
    model = {"dense": lambda: tiny_model("llama").eval(), "routed": _routed, "teal": _teal}[kind]()
    prompt = _prompt()
    torch._dynamo.reset()
    counters.clear()
    with use_backend("cpu"):
        _reset(model)
        expected = StaticDecoder(model, max_length=16, compile=False).generate(prompt, NEW_TOKENS)
        eager_tallies = _tallies(model)
        decoder = StaticDecoder(model, max_length=16)
        decoder.generate(prompt, 2)  # compiles
        _reset(model)
        got = decoder.generate(prompt, NEW_TOKENS)
    assert torch.equal(got, expected)
    assert not counters["graph_break"], dict(counters["graph_break"])
    for eager, compiled in zip(eager_tallies, _tallies(model), strict=True):
        assert torch.equal(compiled, eager)  # the kernel's tally ran inside the graph
    if kind == "routed":
        assert int(moe_layers(model)[0].tokens_seen) == 5 + NEW_TOKENS - 1


@pytest.mark.parametrize(
    ("build", "operator"), [(_routed, "routed_expert_ffn"), (_teal, "threshold_linear")]
)
def test_compiled_graph_calls_the_cpu_operator(build, operator):
    """The kernel is in the compiled graph as the extension's dispatcher operator."""
    from torch.profiler import profile

    model, prompt = build(), _prompt()
    torch._dynamo.reset()
    with use_backend("cpu"):
        decoder = StaticDecoder(model, max_length=16)
        decoder.generate(prompt, 2)
        with profile() as prof:
            decoder.generate(prompt, 3)
    names = {event.key for event in prof.key_averages()}
    assert any(name.endswith(f"::{operator}") for name in names), sorted(names)


@pytest.mark.parametrize(
    ("prompt_len", "new_tokens", "pattern"),
    [(12, 5, "exceed the cache length"), (0, 2, "prompt is empty"), (3, 0, "at least 1")],
)
def test_bad_lengths_are_one_line_errors(prompt_len, new_tokens, pattern):
    decoder = StaticDecoder(tiny_model("llama").eval(), max_length=16, compile=False)
    prompt = torch.ones(1, prompt_len, dtype=torch.long)
    with pytest.raises(MoefyError, match=pattern):
        decoder.generate(prompt, new_tokens)


def test_max_length_below_two_is_refused():
    with pytest.raises(MoefyError, match="at least 2"):
        StaticDecoder(tiny_model("llama").eval(), max_length=1)


def test_decode_speeds_compiled_times_every_variant():
    from moefy.bench.decode import decode_speeds

    dense, routed = tiny_model("llama").eval(), _routed()
    torch._dynamo.reset()
    with use_backend("cpu"):
        speeds = decode_speeds(
            {"dense": dense, "experts": routed}, _prompt(), 3, rounds=1, compiled=True
        )
    assert set(speeds) == {"dense", "experts"}
    assert all(speed.seconds_per_token > 0 for speed in speeds.values())
    # the routed model reads a quarter of its experts: fewer bytes per token
    assert speeds["experts"].bytes_per_token < speeds["dense"].bytes_per_token


def test_frozen_layout_follows_a_dtype_move():
    model = _teal()
    layers = [m for m in model.modules() if hasattr(m, "freeze_for_compile")]
    assert layers
    for layer in layers:
        layer.freeze_for_compile()
    model.to(torch.float64)
    for layer in layers:
        frozen = layer._frozen_weight_t
        assert frozen is not None and frozen.dtype == torch.float64
        assert torch.equal(frozen, layer.base_layer.weight.detach().t())


def _zeros_seen(model) -> int:
    from moefy.sparsify.wrappers import sparse_modules

    return sum(int(wrapper.zeros_seen) for _, wrapper in sparse_modules(model))


def test_uncounted_compiled_step_equals_eager_and_leaves_counters_alone():
    """count=False traces the step inside counters_paused (Inductor once failed on the None
    tally: "getitem is not an OpOverload"); a counting decoder of the same model still counts."""
    from moefy.cost import reset_counters

    model, prompt = _teal(), _prompt()
    torch._dynamo.reset()
    counters.clear()
    with use_backend("cpu"):
        expected = StaticDecoder(model, max_length=16, compile=False).generate(prompt, NEW_TOKENS)
        reset_counters(model)
        got = StaticDecoder(model, max_length=16, count=False).generate(prompt, NEW_TOKENS)
        assert torch.equal(got, expected)
        assert _zeros_seen(model) == 0
        assert not counters["graph_break"], dict(counters["graph_break"])
        StaticDecoder(model, max_length=16).generate(prompt, NEW_TOKENS)  # the guard: retraced
    assert _zeros_seen(model) > 0


def test_decode_speeds_compiled_counts_the_shares_of_uncounted_steps():
    """The timed steps do not count; the eager counting pass still gives TEAL's bytes."""
    from moefy.bench.decode import decode_speeds

    dense, teal = tiny_model("llama").eval(), _teal()
    torch._dynamo.reset()
    with use_backend("cpu"):
        speeds = decode_speeds(
            {"dense": dense, "teal": teal}, _prompt(), 3, rounds=1, compiled=True
        )
    assert speeds["teal"].bytes_per_token < speeds["dense"].bytes_per_token
