"""Each kernel is one torch.ops.moefy operator: its schema is the reference twin's, its fake gives
the reference's shapes and dtypes, a fullgraph compile holds it; one function says which calls
take a kernel."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

from moefy.errors import MoefyError
from moefy.kernels import (
    Backend,
    kernel_fits,
    ops,
    reference,
    use_backend,
)
from moefy.kernels.backend import triton_interpreting
from moefy.kernels.library import KERNELS, call_operator

needs_interpreter = pytest.mark.skipif(
    not triton_interpreting(), reason="needs triton and TRITON_INTERPRET=1 (tests/conftest.py)"
)


def _cases(dtype: torch.dtype = torch.float32) -> dict[str, tuple]:
    """Operator arguments per kernel: 3 tokens, D=24, E=6, S=4 (gated), I=24, O=F=10."""
    gen = torch.Generator().manual_seed(11)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    x, w_in, w_out, b_in, b_out = rand(3, 24), rand(6, 8, 24), rand(6, 4, 24), rand(6, 8), rand(24)
    mask = torch.rand(3, 6, generator=gen) < 0.5
    weight_t, up_t, threshold = rand(24, 10), rand(24, 10), torch.tensor(0.5)
    counts, seen, zeros = torch.zeros(6, dtype=torch.long), torch.tensor(0), torch.tensor(0)
    router = ([torch.randn(6, 24, generator=gen)], [None])
    expert = (w_in, w_out, b_in, b_out, "silu", True)
    return {
        "expert_ffn": (x, mask, *expert),
        "routed_expert_ffn": (x, *router, 2, counts, seen, *expert),
        "threshold_linear": (x, weight_t, None, threshold, zeros),
        "threshold_gate_up": (x, weight_t, up_t, None, None, threshold, zeros),
    }


def _reference(name: str, args: tuple):
    if name == "routed_expert_ffn":
        x, weights, biases, *rest = args
        return reference.routed_expert_ffn(x, list(zip(weights, biases, strict=True)), *rest)
    return getattr(reference, name)(*args)


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def test_each_public_kernel_is_one_operator_declared_from_its_reference():
    assert KERNELS.names() == [
        "expert_ffn",
        "routed_expert_ffn",
        "threshold_linear",
        "threshold_gate_up",
    ]
    for name in KERNELS.names():
        schema = getattr(torch.ops.moefy, name).default._schema
        arguments = [a.name for a in schema.arguments]
        public = [p for p in inspect.signature(getattr(ops, name)).parameters if p != "backend"]
        if name == "routed_expert_ffn":  # a schema has no (weight, bias) pairs
            public[1:2] = ["router_weights", "router_biases"]
        assert arguments == public, name
        assert public == list(inspect.signature(KERNELS.get(name).value.signature).parameters)


@pytest.mark.parametrize("name", ["expert_ffn", "routed_expert_ffn", "threshold_linear"])
def test_cpu_operators_equal_the_reference_and_tally_the_same(name, fp32):
    args, twin_args = _cases()[name], _cases()[name]  # the same draws, separate tallies
    got = getattr(torch.ops.moefy, name)(*args)
    expected = _reference(name, twin_args)
    for g, e in zip(_flat(got), _flat(expected), strict=True):
        torch.testing.assert_close(g, e, **fp32)
    tallies = [(a, b) for a, b in zip(args, twin_args, strict=True) if isinstance(a, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in tallies)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["expert_ffn", "routed_expert_ffn", "threshold_linear",
                                  "threshold_gate_up"])  # fmt: skip
def test_fake_gives_the_reference_shapes_and_dtypes(name, dtype):
    args = _cases(dtype)[name]
    expected = _reference(name, _cases(dtype)[name])
    on_meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    on_meta = [[t.to("meta") for t in a] if isinstance(a, list) and a[0] is not None else a
               for a in on_meta]  # fmt: skip
    got = getattr(torch.ops.moefy, name)(*on_meta)
    for g, e in zip(_flat(got), _flat(expected), strict=True):
        assert g.device.type == "meta" and g.shape == e.shape and g.dtype == e.dtype == dtype


def test_fullgraph_compile_holds_every_operator(fp32):
    """The traced graph calls torch.ops.moefy.* (no graph break, the kernels are not inlined),
    and the compiled calls give the eager results."""
    from moefy.kernels import expert_ffn, routed_expert_ffn, threshold_gate_up, threshold_linear

    case = _cases()
    x, mask, w_in, w_out, b_in, b_out, act, gated = case["expert_ffn"]
    weight_t, up_t, threshold = case["threshold_gate_up"][1], case["threshold_gate_up"][2], 0.5
    centroids = case["routed_expert_ffn"][1][0]
    threshold = torch.tensor(threshold)
    seen_targets: set[str] = set()

    def capture(graph_module, example_inputs):
        seen_targets.update(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward

    def calls(x, counts, seen, zeros):
        experts = expert_ffn(x, mask, w_in, w_out, b_in, b_out, act, gated)
        routed = routed_expert_ffn(
            x, [(centroids, None)], 2, counts, seen, w_in, w_out, b_in, b_out, act, gated
        )
        linear = threshold_linear(x, weight_t, None, threshold, zeros)
        gate, up = threshold_gate_up(x, weight_t, up_t, None, None, threshold, zeros)
        return experts, routed, linear, gate * up

    tallies = [(torch.zeros(6, dtype=torch.long), torch.tensor(0), torch.tensor(0)) for _ in "ab"]
    torch._dynamo.reset()
    with use_backend("cpu"):
        expected = calls(x, *tallies[0])
        got = torch.compile(calls, fullgraph=True, backend=capture)(x, *tallies[1])
    assert {f"moefy.{name}" for name in KERNELS.names()} <= seen_targets, sorted(seen_targets)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, **fp32)
    assert all(torch.equal(a, b) for a, b in zip(*tallies, strict=True))


def test_compiled_cpu_calls_take_the_backend_in_force():
    x, weight_t = torch.randn(2, 8), torch.randn(8, 4)
    with pytest.raises(MoefyError, match="backend in force"):
        call_operator("threshold_linear", Backend.TRITON, x, weight_t, None, torch.tensor(0.1))


def _grad_weight() -> torch.Tensor:
    return torch.randn(8, 4, requires_grad=True)


# (id, kernel, tokens (N, I), weights, extras, keywords, backend, expected)
FITS = [
    ("fits", "threshold_linear", (2, 8), [(8, 4)], (), {}, "cpu", Backend.CPU),
    ("batch-16", "threshold_linear", (16, 8), [(8, 4)], (), {}, "cpu", Backend.CPU),
    ("batch-17", "threshold_linear", (17, 8), [(8, 4)], (), {}, "cpu", None),
    ("batch-0", "threshold_linear", (0, 8), [(8, 4)], (), {}, "cpu", None),
    ("reference", "threshold_linear", (2, 8), [(8, 4)], (), {}, "reference", None),
    ("float64", "threshold_linear", (2, 8, torch.float64), [(8, 4, torch.float64)], (), {},
     "cpu", None),
    ("strided", "threshold_linear", (2, 8), ["strided"], (), {}, "cpu", None),
    ("strided-copied", "threshold_linear", (2, 8), ["strided"], (), {"contiguous": False}, "cpu",
     Backend.CPU),
    ("grad", "threshold_linear", (2, 8), ["grad"], (), {}, "cpu", None),
    ("float64-bias", "threshold_linear", (2, 8), [(8, 4)], ((4, torch.float64),), {}, "cpu",
     None),
    ("bool-mask", "expert_ffn", (2, 8), [(3, 4, 8), (3, 2, 8)], ((2, 3, torch.bool),), {}, "cpu",
     Backend.CPU),
    ("gate-up-shapes", "threshold_gate_up", (2, 8), [(8, 4), (8, 5)], (), {}, "cpu",
     Backend.CPU),
]  # fmt: skip
TRITON_FITS = [
    ("bf16", "threshold_linear", (2, 8, torch.bfloat16), [(8, 4, torch.bfloat16)], (), {},
     "triton", Backend.TRITON),
    ("mixed", "threshold_linear", (2, 8, torch.bfloat16), [(8, 4)], (), {}, "triton", None),
    ("float64-bias", "threshold_linear", (2, 8), [(8, 4)], ((4, torch.float64),), {}, "triton",
     Backend.TRITON),
    ("gate-up-shapes", "threshold_gate_up", (2, 8), [(8, 4), (8, 5)], (), {}, "triton", None),
    ("gate-up", "threshold_gate_up", (2, 8), [(8, 4), (8, 4)], (), {}, "triton", Backend.TRITON),
]  # fmt: skip


def _tensor(spec) -> torch.Tensor:
    if spec == "strided":
        return torch.randn(4, 8).t()  # (8, 4), not contiguous
    if spec == "grad":
        return _grad_weight()
    *shape, dtype = spec if isinstance(spec[-1], torch.dtype) else (*spec, torch.float32)
    return torch.zeros(shape, dtype=dtype) if dtype is torch.bool else torch.randn(shape).to(dtype)


def _check_fits(name, tokens, weights, extras, keywords, backend, expected):
    x = _tensor(tokens)
    got = kernel_fits(
        name,
        x,
        *(_tensor(w) for w in weights),
        extras=tuple(_tensor(e) for e in extras),
        backend=backend,
        **keywords,
    )
    assert got is expected


FIELDS = ("case", "kernel", "tokens", "weights", "extras", "keywords", "backend", "expected")


@pytest.mark.parametrize(FIELDS, FITS, ids=[row[0] for row in FITS])
def test_kernel_fits(case, kernel, tokens, weights, extras, keywords, backend, expected):
    _check_fits(kernel, tokens, weights, extras, keywords, backend, expected)


@needs_interpreter
@pytest.mark.parametrize(FIELDS, TRITON_FITS, ids=[row[0] for row in TRITON_FITS])
def test_kernel_fits_triton(case, kernel, tokens, weights, extras, keywords, backend, expected):
    _check_fits(kernel, tokens, weights, extras, keywords, backend, expected)


def test_unknown_kernel_is_a_one_line_error():
    with pytest.raises(MoefyError, match="unknown kernel 'threshold_lin'.*threshold_linear"):
        kernel_fits("threshold_lin", torch.randn(1, 8), torch.randn(8, 4))


def test_kernel_fits_answers_what_the_model_code_asks():
    x, weight = torch.randn(2, 8), torch.randn(4, 8)  # a Linear's (O, I) weight
    w_in, w_out = torch.randn(3, 4, 8), torch.randn(3, 2, 8)
    with use_backend("cpu"):
        assert kernel_fits("threshold_linear", x, weight.t().contiguous()) is Backend.CPU
        assert kernel_fits("threshold_linear", x, weight.t()) is None  # not the kernel's layout
        # a layer's own weight: the kernel reads its cached contiguous copy
        assert kernel_fits("threshold_linear", x, weight, contiguous=False) is Backend.CPU
        assert kernel_fits("expert_ffn", x, w_in, w_out) is Backend.CPU
        assert kernel_fits("expert_ffn", torch.randn(17, 8), w_in, w_out) is None  # prefill
    with use_backend("reference"):
        assert kernel_fits("threshold_linear", x, weight.t().contiguous()) is None
        assert kernel_fits("expert_ffn", x, w_in, w_out) is None


# In a process without Triton's interpreter the extension registers its C++ kernels as the
# operators' CPU implementation; the suite's own process interprets Triton (tests/conftest.py).
_CPP_OPERATORS_SCRIPT = """
import sys
import torch
from moefy.kernels import threshold_linear, use_backend
from moefy.kernels.backend import cpu_extension
sys.path.insert(0, sys.argv[1])
from test_kernels_library import _cases, _flat, _reference

cpu_extension()
for name in _cases():
    args = _cases()[name]  # fresh draws: the cases share their tallies
    table = torch._C._dispatch_dump(f"moefy::{name}")
    assert "CPU: registered at" in table and "sparse_ffn.cpp" in table, table
    twin_args = _cases()[name]
    got, expected = getattr(torch.ops.moefy, name)(*args), _reference(name, twin_args)
    for g, e in zip(_flat(got), _flat(expected), strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    for a, b in zip(args, twin_args, strict=True):
        assert not isinstance(a, torch.Tensor) or torch.equal(a, b), name  # tallies
x, weight_t, _, threshold, _ = _cases()["threshold_linear"]
zeros = [torch.tensor(0), torch.tensor(0)]
with use_backend("cpu"):
    expected = threshold_linear(x, weight_t, None, threshold, zeros[0])
    compiled = torch.compile(threshold_linear, fullgraph=True, backend="aot_eager")
    got = compiled(x, weight_t, None, threshold, zeros[1])
assert torch.equal(got, expected) and int(zeros[0]) == int(zeros[1]) > 0
print("ok")
"""


def test_cpp_kernels_are_the_cpu_implementation_without_the_interpreter():
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _CPP_OPERATORS_SCRIPT, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok"]


def test_all_zero_test_is_remembered_for_tensors_of_many_entries():
    import gc

    from moefy.kernels import layout

    threshold = torch.zeros(6)  # a per-channel (WINA) threshold: asked on every decode step
    assert layout.is_all_zero(threshold) and layout.is_all_zero(threshold)
    threshold[2] = 0.5  # an in-place change bumps the version: asked again
    assert not layout.is_all_zero(threshold) and not layout.is_all_zero(threshold)
    ident = id(threshold)
    del threshold
    gc.collect()
    assert ident not in layout._all_zero  # forgotten with the tensor
