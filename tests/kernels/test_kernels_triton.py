"""The Triton kernels against their reference twins in float64.

Without a GPU they run under Triton's interpreter on CPU tensors: the kernels' indexing, masks,
splits and numerics, not their speed. Triton decides at import whether it interprets, so
``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports it, where there is no
CUDA; where CUDA is present the interpreter tests skip and the ``gpu`` tests run compiled kernels.

Each check draws fresh random inputs, poisons outputs and work buffers with NaN (every element
must be written, and no unwritten one read), and compares ``||out - ref|| / ||ref||`` with a
float64 reference on the same inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from moefy.errors import MoefyError
from moefy.kernels import (
    SMALL_BATCH_MAX,
    expert_ffn,
    reference,
    threshold_gate_up,
    threshold_linear,
)
from moefy.kernels import backend as kernel_backend
from moefy.kernels.activations import ACTIVATIONS

triton = pytest.importorskip("triton")

from moefy.kernels import triton_experts, triton_kernels, triton_threshold  # noqa: E402
from moefy.kernels.triton_launch import interpreter_active  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SPARSITIES = (0.0, 0.5, 1.0)
# (N, I, O): one element, odd widths, fewer rows than one block (one split), batch 1..16
LINEAR_SHAPES = [
    (1, 1, 1),
    (1, 37, 19),
    (2, 17, 130),
    (3, 70, 150),
    (SMALL_BATCH_MAX, 96, 40),
    (7, 129, 257),
]
# (N, D, E, S, gated): odd widths, one slot, one expert, batch 1..16
EXPERT_SHAPES = [
    (1, 37, 5, 3, True),
    (1, 130, 4, 17, False),
    (2, 8, 1, 1, True),
    (3, 70, 6, 20, False),
    (9, 21, 7, 5, True),
    (SMALL_BATCH_MAX, 64, 4, 17, True),
]


interpreted = pytest.mark.skipif(
    not interpreter_active(), reason="triton was imported without TRITON_INTERPRET=1"
)


@pytest.fixture
def poisoned_scratch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Work buffers full of NaN: a kernel that reads an element it did not write returns NaN."""

    def nan_scratch(*shape: int, device: torch.device) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)

    monkeypatch.setattr(triton_threshold, "scratch", nan_scratch)
    monkeypatch.setattr(triton_experts, "scratch", nan_scratch)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(got).all(), "NaN or inf in the output"
    if expected.norm() == 0:
        return float((got - expected).abs().max()) if got.numel() else 0.0
    return float((got - expected).norm() / expected.norm())


def _f64(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.double()


def _threshold_for(x: torch.Tensor, sparsity: float, per_channel: bool) -> torch.Tensor:
    """A threshold in x's dtype (so the float64 reference compares the same numbers)."""
    magnitudes = x.abs().float() if per_channel else x.abs().float().reshape(-1, 1)
    if sparsity == 0.0:
        values = torch.zeros(magnitudes.shape[1])
    elif sparsity == 1.0:
        values = magnitudes.amax(0)  # |x| <= its maximum: every input dropped
    else:
        values = magnitudes.quantile(sparsity, dim=0)
    values = values.to(x.dtype)
    return values if per_channel else values.reshape(())


def _linear_case(N, n_in, n_out, dtype, sparsity, per_channel, bias, gen):
    x = torch.randn(N, n_in, generator=gen).to(dtype)
    weight_t = (torch.randn(n_in, n_out, generator=gen) / n_in**0.5).to(dtype)
    b = torch.randn(n_out, generator=gen).to(dtype) if bias else None
    return x, weight_t, b, _threshold_for(x, sparsity, per_channel)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_threshold_linear_matches_float64(shape, sparsity, dtype, relative_error):
    gen = torch.Generator().manual_seed(sum(shape) + int(10 * sparsity) + DTYPES.index(dtype))
    per_channel, bias = bool(shape[1] % 2), bool(shape[2] % 2)
    x, weight_t, b, thr = _linear_case(*shape, dtype, sparsity, per_channel, bias, gen)
    zeros = torch.tensor(3, dtype=torch.int64)
    got = threshold_linear(x, weight_t, b, thr, zeros, backend="triton")
    expected_zeros = torch.tensor(3, dtype=torch.int64)
    expected = reference.threshold_linear(
        x.double(), weight_t.double(), _f64(b), thr.double(), expected_zeros
    )
    assert got.shape == shape[::2] and got.dtype == dtype
    assert _relative_error(got, expected) <= relative_error[dtype]
    assert int(zeros) == int(expected_zeros)
    if sparsity == 1.0:  # nothing read: exactly the bias
        assert torch.equal(got, torch.zeros_like(got) if b is None else b.expand_as(got))


@interpreted
@pytest.mark.parametrize("splits", [1, 2, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threshold_splits_write_every_output(splits, dtype, poisoned_scratch, relative_error):
    """Poisoned outputs and partial sums, one split (no reduce launch) or several."""
    gen = torch.Generator().manual_seed(splits)
    x, weight_t, b, thr = _linear_case(5, 150, 260, dtype, 0.4, True, True, gen)
    out = torch.full((5, 260), float("nan"), dtype=dtype)
    (got,) = triton_threshold.threshold_project(x, [weight_t], [b], thr, outs=[out], splits=splits)
    assert got is out
    expected = reference.threshold_linear(x.double(), weight_t.double(), b.double(), thr.double())
    assert _relative_error(got, expected) <= relative_error[dtype]


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 4])
def test_threshold_never_reads_dropped_rows(batch, dtype):
    """Rows of inputs every token drops hold NaN: reading one would poison the output."""
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 70, generator=gen).to(dtype)
    dropped = torch.arange(70) % 3 == 0
    x[:, dropped] = 0.01
    weight_t = torch.randn(70, 45, generator=gen).to(dtype)
    weight_t[dropped] = float("nan")
    thr = torch.tensor(0.1)
    got = threshold_linear(x, weight_t, None, thr, backend="triton")
    kept = x.double().masked_fill(x.abs() <= thr, 0.0)  # compared in x's dtype, as torch does
    expected = kept @ weight_t.double().nan_to_num(0.0)
    assert _relative_error(got, expected) <= 1e-2


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 37, 19), (6, 70, 150)], ids=["1x37x19", "6x70x150"])
def test_threshold_gate_up_matches_float64(shape, dtype, poisoned_scratch, relative_error):
    N, n_in, n_ff = shape
    gen = torch.Generator().manual_seed(n_in)
    x = torch.randn(N, n_in, generator=gen).to(dtype)
    gate_t, up_t = (torch.randn(n_in, n_ff, generator=gen).to(dtype) for _ in range(2))
    up_bias = torch.randn(n_ff, generator=gen).to(dtype)  # one bias only: the other is zero
    thr = _threshold_for(x, 0.5, per_channel=False)
    zeros = torch.tensor(0, dtype=torch.int64)
    gate, up = threshold_gate_up(x, gate_t, up_t, None, up_bias, thr, zeros, backend="triton")
    expected_zeros = torch.tensor(0, dtype=torch.int64)
    expected_gate, expected_up = reference.threshold_gate_up(
        x.double(), gate_t.double(), up_t.double(), None, up_bias.double(), thr.double(),
        expected_zeros,
    )  # fmt: skip
    assert _relative_error(gate, expected_gate) <= relative_error[dtype]
    assert _relative_error(up, expected_up) <= relative_error[dtype]
    assert int(zeros) == int(expected_zeros) > 0  # counted once, not once per projection


@interpreted
def test_threshold_compares_in_the_reference_dtype():
    """A 0-d float32 threshold against bf16 inputs compares in bf16, as torch does."""
    x = torch.tensor([[0.1, 0.5, 0.30078125, -0.2998046875]], dtype=torch.bfloat16)
    weight_t = torch.eye(4, dtype=torch.bfloat16)
    thr = torch.tensor(0.3)  # rounds to 0.30078125 in bf16
    got = threshold_linear(x, weight_t, None, thr, backend="triton")
    expected = reference.threshold_linear(x, weight_t, None, thr)
    assert torch.equal(got, expected)


def _expert_case(N, D, E, S, gated, dtype, bias, gen):
    S_in = 2 * S if gated else S
    x = torch.randn(N, D, generator=gen).to(dtype)
    w_in = (torch.randn(E, S_in, D, generator=gen) / D**0.5).to(dtype)
    w_out = (torch.randn(E, S, D, generator=gen) / S**0.5).to(dtype)
    b_in = torch.randn(E, S_in, generator=gen).to(dtype) if bias else None
    b_out = torch.randn(D, generator=gen).to(dtype) if bias else None
    return x, w_in, w_out, b_in, b_out


def _expert_reference(x, mask, w_in, w_out, b_in, b_out, act, gated):
    return reference.expert_ffn(
        x.double(), mask, w_in.double(), w_out.double(), _f64(b_in), _f64(b_out), act, gated
    )


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("selected", ["none", "random", "all"])
@pytest.mark.parametrize("shape", EXPERT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_expert_ffn_matches_float64(shape, selected, dtype, poisoned_scratch, relative_error):
    N, D, E, S, gated = shape
    gen = torch.Generator().manual_seed(sum(shape) + len(selected) + DTYPES.index(dtype))
    act = sorted(ACTIVATIONS)[(N + D) % len(ACTIVATIONS)]
    bias = bool(D % 2)
    x, w_in, w_out, b_in, b_out = _expert_case(N, D, E, S, gated, dtype, bias, gen)
    mask = {
        "none": torch.zeros(N, E, dtype=torch.bool),
        "random": torch.rand(N, E, generator=gen) < 0.4,
        "all": torch.ones(N, E, dtype=torch.bool),
    }[selected]
    got = expert_ffn(x, mask, w_in, w_out, b_in, b_out, act, gated, backend="triton")
    expected = _expert_reference(x, mask, w_in, w_out, b_in, b_out, act, gated)
    assert got.shape == (N, D) and got.dtype == dtype
    assert _relative_error(got, expected) <= relative_error[dtype]
    if selected == "none":
        assert torch.equal(got, torch.zeros_like(got) if b_out is None else b_out.expand_as(got))


@interpreted
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("batch", [1, 5])
def test_expert_ffn_activations(act, batch, poisoned_scratch, relative_error):
    gen = torch.Generator().manual_seed(batch)
    x, w_in, w_out, b_in, b_out = _expert_case(batch, 40, 6, 9, True, torch.float32, True, gen)
    x = 3.0 * x  # pre-activations well into both tails
    mask = torch.rand(batch, 6, generator=gen) < 0.5
    got = expert_ffn(x, mask, w_in, w_out, b_in, b_out, act, True, backend="triton")
    expected = _expert_reference(x, mask, w_in, w_out, b_in, b_out, act, True)
    assert _relative_error(got, expected) <= relative_error[torch.float32]


@interpreted
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_expert_ffn_splits_write_every_output(splits, poisoned_scratch, relative_error):
    gen = torch.Generator().manual_seed(splits)
    x, w_in, w_out, b_in, b_out = _expert_case(4, 130, 8, 9, True, torch.bfloat16, True, gen)
    mask = torch.rand(4, 8, generator=gen) < 0.3
    mask[0, 7] = True
    out = torch.full((4, 130), float("nan"), dtype=torch.bfloat16)
    got = triton_experts.expert_ffn(
        x, mask, w_in, w_out, b_in, b_out, "silu", True, out=out, splits=splits
    )
    assert got is out
    expected = _expert_reference(x, mask, w_in, w_out, b_in, b_out, "silu", True)
    assert _relative_error(got, expected) <= relative_error[torch.bfloat16]


@interpreted
@pytest.mark.parametrize("batch", [1, 3])
def test_expert_ffn_never_reads_unselected_experts(batch):
    gen = torch.Generator().manual_seed(batch)
    x, w_in, w_out, _, _ = _expert_case(batch, 40, 6, 5, True, torch.float16, False, gen)
    mask = torch.rand(batch, 6, generator=gen) < 0.6
    mask[:, 3] = False
    mask[0, 0] = True
    w_in[3], w_out[3] = float("nan"), float("nan")
    got = expert_ffn(x, mask, w_in, w_out, None, None, "gelu_tanh", True, backend="triton")
    w_in[3], w_out[3] = 0.0, 0.0
    expected = _expert_reference(x, mask, w_in, w_out, None, None, "gelu_tanh", True)
    assert _relative_error(got, expected) <= 2e-3


@interpreted
def test_triton_backend_runs_the_triton_kernels(monkeypatch):
    calls = []
    real = triton_kernels.threshold_linear
    monkeypatch.setattr(triton_kernels, "threshold_linear", lambda *a: calls.append(1) or real(*a))
    x, weight_t = torch.randn(2, 8), torch.randn(8, 5)
    threshold_linear(x, weight_t, None, torch.tensor(0.5), backend="triton")
    assert calls == [1]
    with kernel_backend.use_backend("auto"):  # auto never interprets CPU tensors
        threshold_linear(x, weight_t, None, torch.tensor(0.5))
    assert calls == [1]


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_routed_expert_ffn_routes_in_torch_then_runs_the_triton_experts(
    dtype, monkeypatch, relative_error
):
    """Under triton the router (fp32, as a bf16 model may carry) runs in torch, the experts in
    the Triton kernel; the tally and the output match the reference twin."""
    from moefy.kernels import routed_expert_ffn

    calls = []
    real = triton_kernels.expert_ffn
    monkeypatch.setattr(triton_kernels, "expert_ffn", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(3)
    N, D, E, S = 3, 40, 6, 5
    x = torch.randn(N, D, generator=gen).to(dtype)
    w_in = (torch.randn(E, 2 * S, D, generator=gen) / D**0.5).to(dtype)
    w_out = (torch.randn(E, S, D, generator=gen) / S**0.5).to(dtype)
    layers = [(torch.randn(9, D, generator=gen), torch.randn(9, generator=gen))]
    layers.append((torch.randn(E, 9, generator=gen), None))
    tallies = {}
    for backend in ("triton", "reference"):
        counts, seen = torch.zeros(E, dtype=torch.long), torch.tensor(0)
        out = routed_expert_ffn(
            x, layers, 2, counts, seen, w_in, w_out, None, None, "silu", True, backend=backend
        )
        tallies[backend] = (out.double(), counts, int(seen))
    assert calls == [1]
    assert torch.equal(tallies["triton"][1], tallies["reference"][1])
    assert tallies["triton"][2] == tallies["reference"][2] == N
    error = _relative_error(tallies["triton"][0], tallies["reference"][0])
    assert error < relative_error[dtype]


@interpreted
def test_triton_falls_back_to_torch_where_the_kernels_do_not_fit(monkeypatch):
    def no_kernel(*_args):
        raise AssertionError("the triton kernel ran on a call it does not take")

    monkeypatch.setattr(triton_kernels, "threshold_linear", no_kernel)
    weight_t = torch.randn(8, 5)
    big_batch = torch.randn(SMALL_BATCH_MAX + 1, 8)
    got = threshold_linear(big_batch, weight_t, None, torch.tensor(0.5), backend="triton")
    expected = reference.threshold_linear(big_batch, weight_t, None, torch.tensor(0.5))
    torch.testing.assert_close(got, expected)
    needs_grad = torch.randn(2, 8, requires_grad=True)
    got = threshold_linear(needs_grad, weight_t, None, torch.tensor(0.5), backend="triton")
    assert got.requires_grad
    mixed = torch.randn(2, 8, dtype=torch.float64)
    threshold_linear(mixed, weight_t.double(), None, torch.tensor(0.5), backend="triton")


@interpreted
def test_cpu_operators_run_the_triton_kernels_while_triton_is_in_force(monkeypatch):
    """Under the interpreter the operators' CPU implementation is Triton's while triton is the
    backend in force (routed: torch routing, then the Triton experts), C++ otherwise."""
    calls = []
    for name in ("expert_ffn", "threshold_linear"):
        real = getattr(triton_kernels, name)
        spy = lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a)  # noqa: E731
        monkeypatch.setattr(triton_kernels, name, spy)
    gen = torch.Generator().manual_seed(5)
    x, w_in, w_out, _, _ = _expert_case(2, 24, 4, 3, True, torch.float32, False, gen)
    centroids, weight_t = torch.randn(4, 24, generator=gen), torch.randn(24, 6, generator=gen)
    tallies = [(torch.zeros(4, dtype=torch.long), torch.tensor(0)) for _ in "ab"]
    with kernel_backend.use_backend("triton"):
        routed = torch.ops.moefy.routed_expert_ffn(
            x, [centroids], [None], 2, *tallies[0], w_in, w_out, None, None, "silu", True
        )
        linear = torch.ops.moefy.threshold_linear(x, weight_t, None, torch.tensor(0.5))
    assert calls == ["expert_ffn", "threshold_linear"]
    expected = reference.routed_expert_ffn(
        x, [(centroids, None)], 2, *tallies[1], w_in, w_out, None, None, "silu", True
    )
    assert _relative_error(routed, expected) <= 1e-5
    assert all(torch.equal(a, b) for a, b in zip(*tallies, strict=True))
    expected = reference.threshold_linear(x, weight_t, None, torch.tensor(0.5))
    assert _relative_error(linear, expected) <= 1e-5
    with kernel_backend.use_backend("cpu"):
        torch.ops.moefy.threshold_linear(x, weight_t, None, torch.tensor(0.5))
    assert len(calls) == 2  # the C++ kernel ran


def test_triton_on_cpu_tensors_without_interpreter_is_one_line_error(monkeypatch):
    monkeypatch.delenv(kernel_backend.INTERPRET_ENV, raising=False)
    x, weight_t = torch.randn(2, 8), torch.randn(8, 5)
    with pytest.raises(MoefyError) as caught:
        threshold_linear(x, weight_t, None, torch.tensor(0.5), backend="triton")
    assert "\n" not in str(caught.value)
    if torch.cuda.is_available():
        assert "runs CUDA tensors" in str(caught.value)
    else:
        assert "needs a CUDA GPU" in str(caught.value)


# --- compiled kernels on a GPU ------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or interpreter_active(),
    reason="needs CUDA, and triton imported without TRITON_INTERPRET=1",
)

# Llama-3-8B projections and odd sizes, batch 1 / 4 / 16
GPU_LINEAR_SHAPES = [(1, 4096, 14336), (4, 14336, 4096), (16, 4096, 4096), (3, 1000, 777)]
GPU_EXPERT_SHAPES = [(1, 4096, 64, 224, True), (16, 4096, 64, 224, True), (5, 1000, 9, 37, False)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", GPU_LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_threshold_linear(shape, sparsity, dtype, monkeypatch, relative_error):
    monkeypatch.delenv(kernel_backend.INTERPRET_ENV, raising=False)
    gen = torch.Generator().manual_seed(shape[1])
    x, weight_t, b, thr = _linear_case(*shape, dtype, sparsity, True, True, gen)
    expected = reference.threshold_linear(x.double(), weight_t.double(), b.double(), thr.double())
    cuda = [t.cuda() for t in (x, weight_t, b, thr)]
    got = threshold_linear(*cuda, backend="triton")
    gate, up = threshold_gate_up(cuda[0], cuda[1], cuda[1], cuda[2], None, cuda[3])
    torch.cuda.synchronize()
    assert _relative_error(got, expected) <= relative_error[dtype]
    assert _relative_error(gate, expected) <= relative_error[dtype]  # auto: triton on CUDA
    assert _relative_error(up, expected - b.double()) <= relative_error[dtype]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_EXPERT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_expert_ffn(shape, dtype, monkeypatch, relative_error):
    monkeypatch.delenv(kernel_backend.INTERPRET_ENV, raising=False)
    N, D, E, S, gated = shape
    gen = torch.Generator().manual_seed(D)
    x, w_in, w_out, b_in, b_out = _expert_case(N, D, E, S, gated, dtype, True, gen)
    mask = torch.rand(N, E, generator=gen) < 0.25
    expected = _expert_reference(x, mask, w_in, w_out, b_in, b_out, "silu", gated)
    cuda = [t.cuda() for t in (x, mask, w_in, w_out, b_in, b_out)]
    out = torch.full((N, D), float("nan"), dtype=dtype, device="cuda")
    got = triton_experts.expert_ffn(*cuda, "silu", gated, out=out)
    via_auto = expert_ffn(*cuda, "silu", gated)
    torch.cuda.synchronize()
    assert _relative_error(got, expected) <= relative_error[dtype]
    assert _relative_error(via_auto, expected) <= relative_error[dtype]


# --- compiled for Hopper without a GPU ----------------------------------------------------------

# Runs in a fresh process without TRITON_INTERPRET: triton compiles to PTX and, with its bundled
# ptxas, to sm_90 machine code with no GPU or driver present.
_COMPILE_SCRIPT = """
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moefy.kernels import triton_experts as te, triton_launch as tlaunch, triton_threshold as tt

def build(fn, signature, constexprs):
    full = {**signature, **{name: "constexpr" for name in constexprs}}
    names = list(full)
    # what triton's launcher infers from real arguments: 16-aligned pointers and widths
    attrs = {(names.index(n),): [["tt.divisibility", 16]]
             for n in signature if n.endswith("ptr") or n in ("n_in", "n_out", "D")}
    compiled = triton.compile(
        ASTSource(fn, full, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 4},
    )
    ptx = compiled.asm["ptx"]
    return {"v4_loads": len(re.findall(r"ld\\.global[.\\w]*\\.v4", ptx)),
            "local": ptx.count("ld.local") + ptx.count("st.local"),
            "cubin": len(compiled.asm["cubin"])}

dt = sys.argv[1]
fp32 = dt == "fp32"
names = ["x_ptr", "thr_ptr", "w_ptr", "w2_ptr", "bias_ptr", "bias2_ptr", "out_ptr", "out2_ptr",
         "part_ptr", "part2_ptr", "N", "n_in", "n_out", "thr_stride"]
typed = ("x_ptr", "w_ptr", "w2_ptr", "bias_ptr", "bias2_ptr", "out_ptr", "out2_ptr")
sig = {n: "*" + dt if n in typed else "*fp32" if n.endswith("ptr") else "i32" for n in names}
up = {"x_ptr": "*" + dt, "mask_ptr": "*u8", "w_in_ptr": "*" + dt, "b_in_ptr": "*" + dt,
      "hidden_ptr": "*fp32", "N": "i32", "E": "i32"}
down = {"hidden_ptr": "*fp32", "mask_ptr": "*u8", "w_out_ptr": "*" + dt, "bias_ptr": "*" + dt,
        "out_ptr": "*" + dt, "part_ptr": "*fp32", "N": "i32", "E": "i32", "D": "i32"}
red = {"part_ptr": "*fp32", "part2_ptr": "*fp32", "bias_ptr": "*" + dt, "bias2_ptr": "*" + dt,
       "out_ptr": "*" + dt, "out2_ptr": "*" + dt, "numel": "i32", "columns": "i32"}
report = {}
for block_n in (1, 16):
    report[f"threshold-{block_n}"] = build(tt._threshold_kernel, sig, dict(
        ROWS_PER_SPLIT=896, PAIR=block_n == 16, FINAL=block_n == 1, HAS_BIAS=True,
        DOT_FP32=fp32, BLOCK_N=block_n, BLOCK_I=tt.BLOCK_I, BLOCK_O=tt.BLOCK_O))
    report[f"up-{block_n}"] = build(te._expert_up_kernel, up, dict(
        S=224, D=4096, GATED=True, HAS_BIAS=True, ACT=block_n % 4, DOT_FP32=fp32,
        BLOCK_N=block_n, BLOCK_S=te.BLOCK_S, BLOCK_D=te.BLOCK_D_UP))
    report[f"down-{block_n}"] = build(te._expert_down_kernel, down, dict(
        S=224, EXPERTS_PER_SPLIT=4, FINAL=block_n == 1, HAS_BIAS=True, DOT_FP32=fp32,
        BLOCK_N=block_n, BLOCK_S=te.BLOCK_S, BLOCK_D=te.BLOCK_D_DOWN))
report["reduce"] = build(tlaunch._reduce_partials_kernel, red, dict(
    SPLITS=5, PAIR=True, HAS_BIAS=True, BLOCK=1024))
print(json.dumps(report))
"""


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_hopper_without_a_gpu(dtype):
    """Every kernel compiles for sm_90; batch-1 weight loads are 16 bytes wide; nothing spills."""
    env = {k: v for k, v in os.environ.items() if k != kernel_backend.INTERPRET_ENV}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, dtype],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert all(kernel["cubin"] > 0 and kernel["local"] == 0 for kernel in report.values())
    for name in ("threshold-1", "up-1", "down-1"):
        assert report[name]["v4_loads"] > 0, name


def test_compiled_graphs_call_the_triton_operators():
    """Under torch.compile the Triton entry points are custom operators (the tracer does not
    enter the launcher): a fullgraph trace gives the eager outputs and zero counts."""
    from torch._dynamo.utils import counters

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not interpreter_active():
        pytest.skip("needs CUDA or the triton interpreter")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, generator=gen).to(device)
    weight_t = torch.randn(32, 24, generator=gen).to(device)
    threshold = torch.tensor(0.4, device=device)
    w_in = torch.randn(4, 8, 32, generator=gen).to(device)
    w_out = torch.randn(4, 4, 32, generator=gen).to(device)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]], device=device)

    def calls(x, zeros):
        gate, up = threshold_gate_up(x, weight_t, weight_t, None, None, threshold, zeros)
        linear = threshold_linear(x, weight_t, None, threshold, zeros)
        experts = expert_ffn(x, mask, w_in, w_out, None, None, "silu", True)
        return gate * up, linear + 1, experts

    counts = [torch.tensor(0, device=device) for _ in "ab"]
    with kernel_backend.use_backend("triton"):
        expected = calls(x, counts[0])
        counters.clear()
        got = torch.compile(calls, fullgraph=True, backend="aot_eager")(x, counts[1])
    assert not counters["graph_break"]
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)
    assert int(counts[0]) == int(counts[1]) > 0
