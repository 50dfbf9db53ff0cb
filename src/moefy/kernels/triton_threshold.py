"""Triton threshold-sparse linear layers (the TEAL layout) for CUDA tensors.

Shape legend:
    N: tokens (1..16), I: input features, O: output features, P: splits of I

The weight is stored transposed, (I, O): input ``i`` owns one contiguous row, so an input whose
``|x_i|`` is under its threshold for every token is a row the kernel never loads (masked rows
issue no memory traffic). A program owns ``BLOCK_O`` output columns (coalesced along O) and one
split of the input rows; splits write float32 partial sums that one small launch adds, with the
bias, in a fixed order (no atomics, so results repeat exactly).

One kernel serves q/k/v/o and down (one weight) and gate + up (two weights read under the same
input mask in one pass over x, two outputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moefy.kernels import triton_launch as launch
from moefy.kernels.triton_launch import accumulate, scratch

BLOCK_O = 128  # output columns per program: 256 contiguous bytes of a bf16 row
BLOCK_I = 32  # input rows per step
TOKEN_BLOCK = 16  # tile products need 16 rows; batch 1 reduces without them
NUM_WARPS = 4


@triton.jit
def _threshold_kernel(
    x_ptr,
    thr_ptr,
    w_ptr,
    w2_ptr,
    bias_ptr,
    bias2_ptr,
    out_ptr,
    out2_ptr,
    part_ptr,
    part2_ptr,
    N,
    n_in,
    n_out,
    thr_stride,
    ROWS_PER_SPLIT: tl.constexpr,
    PAIR: tl.constexpr,
    FINAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """(N, O) [+ a second (N, O)] from x (N, I) and w (I, O), skipping rows nobody keeps."""
    pid_o = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = offs_o < n_out
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    i_start = pid_k * ROWS_PER_SPLIT
    i_end = tl.minimum(i_start + ROWS_PER_SPLIT, n_in)
    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    # constexpr loop bounds: triton 3.6's interpreter cannot loop to a run-time int with numpy 2.4
    for step in range(0, ROWS_PER_SPLIT, BLOCK_I):
        offs_i = i_start + step + tl.arange(0, BLOCK_I)
        i_ok = offs_i < i_end
        x = tl.load(
            x_ptr + offs_n[:, None] * n_in + offs_i[None, :],
            mask=n_ok[:, None] & i_ok[None, :],
            other=0.0,
        ).to(tl.float32)  # (BLOCK_N, BLOCK_I)
        thr = tl.load(thr_ptr + offs_i * thr_stride, mask=i_ok, other=0.0)
        # the reference drops |x| <= thr; NaN stays (compares false); exact zeros need no row
        keep = (~(tl.abs(x) <= thr[None, :])) & (x != 0.0)
        x = tl.where(keep, x, 0.0)
        row_read = tl.max(keep.to(tl.int32), axis=0) > 0  # (BLOCK_I,): some token keeps it
        rows = offs_i.to(tl.int64)[:, None] * n_out + offs_o[None, :]
        w_mask = row_read[:, None] & o_ok[None, :]
        w = tl.load(w_ptr + rows, mask=w_mask, other=0.0)  # (BLOCK_I, BLOCK_O)
        acc = accumulate(acc, x, w, BLOCK_N, DOT_FP32)
        if PAIR:
            w2 = tl.load(w2_ptr + rows, mask=w_mask, other=0.0)
            acc2 = accumulate(acc2, x, w2, BLOCK_N, DOT_FP32)
    out_mask = n_ok[:, None] & o_ok[None, :]
    cells = offs_n[:, None] * n_out + offs_o[None, :]
    if FINAL:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + cells, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
        if PAIR:
            if HAS_BIAS:
                acc2 += tl.load(bias2_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out2_ptr + cells, acc2.to(out2_ptr.dtype.element_ty), mask=out_mask)
    else:
        base = pid_k * N * n_out
        tl.store(part_ptr + base + cells, acc, mask=out_mask)
        if PAIR:
            tl.store(part2_ptr + base + cells, acc2, mask=out_mask)


def _comparable_threshold(x: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The threshold as float32 on x's device, rounded as the reference compares it.

    ``x.abs() <= threshold`` in torch compares in the promoted dtype (a 0-d float32 threshold
    against bf16 inputs compares in bf16); rounding to that dtype first and widening to float32
    (exact) gives the same answers. Returns the (I,) or (1,) values and their stride (0 or 1).
    """
    compare_dtype = torch.result_type(x, threshold)
    values = threshold.to(device=x.device, dtype=compare_dtype).to(torch.float32).reshape(-1)
    return values.contiguous(), int(values.numel() != 1)


def _count_zeros(x: torch.Tensor, threshold: torch.Tensor, zeros_out: torch.Tensor) -> None:
    """Add the zero inputs after dropping to ``zeros_out``, as the reference does."""
    zeros_out += ((x.abs() <= threshold) | (x == 0)).sum()


def threshold_project(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    threshold: torch.Tensor,
    *,
    outs: list[torch.Tensor] | None = None,
    splits: int | None = None,
    num_stages: int | None = None,
) -> list[torch.Tensor]:
    """One or two threshold-sparse projections of the same input in one pass over it.

    Args:
        x: (N, I) float16 / bfloat16 / float32, N in 1..16.
        weights: one or two (I, O) contiguous weights of x's dtype.
        biases: (O,) or None, one per weight (all None or none None).
        threshold: () or (I,).
        outs: preallocated (N, O) outputs (tests poison them); default new tensors.
        splits: how many splits of I (default: enough programs for the device).
        num_stages: Triton's software-pipelining depth (default: Triton's own); a tuning knob
            for ``benchmarks/gpu_kernel_splits.py``, ignored by the interpreter.

    Returns:
        The (N, O) outputs in x's dtype.
    """
    N, n_in = x.shape
    n_out = weights[0].shape[1]
    device = x.device
    x = x.contiguous()
    thr, thr_stride = _comparable_threshold(x, threshold)
    if outs is None:
        outs = [torch.empty(N, n_out, dtype=x.dtype, device=device) for _ in weights]
    column_programs = triton.cdiv(n_out, BLOCK_O)
    rows_per_split, split_count = launch.split_rows(n_in, column_programs, BLOCK_I, device, splits)
    final = split_count == 1
    # final: one split writes the outputs itself and the partial buffers go unused
    part_shape = (1,) if final else (split_count, N, n_out)
    parts = [scratch(*part_shape, device=device) for _ in weights]
    has_bias = biases[0] is not None
    pair = len(weights) == 2
    launch.kernel(_threshold_kernel, device)[(column_programs, split_count)](
        x,
        thr,
        weights[0],
        weights[-1],
        biases[0] if has_bias else thr,
        biases[-1] if has_bias else thr,
        outs[0],
        outs[-1],
        parts[0],
        parts[-1],
        N,
        n_in,
        n_out,
        thr_stride,
        ROWS_PER_SPLIT=rows_per_split,
        PAIR=pair,
        FINAL=final,
        HAS_BIAS=has_bias,
        DOT_FP32=launch.dot_in_fp32(weights[0].dtype, device),
        BLOCK_N=1 if N == 1 else TOKEN_BLOCK,
        BLOCK_I=BLOCK_I,
        BLOCK_O=BLOCK_O,
        num_warps=NUM_WARPS,
        **({} if num_stages is None else {"num_stages": num_stages}),
    )
    if not final:
        launch.reduce_partials(parts, biases, outs)
    return outs


def threshold_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: torch.Tensor,
    zeros_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, O) linear output skipping dropped inputs; see :func:`reference.threshold_linear`."""
    if zeros_out is not None:
        _count_zeros(x, threshold.to(x.device), zeros_out)
    return threshold_project(x, [weight_t], [bias], threshold)[0]


def threshold_gate_up(
    x: torch.Tensor,
    gate_t: torch.Tensor,
    up_t: torch.Tensor,
    gate_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    threshold: torch.Tensor,
    zeros_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up outputs in one pass; see :func:`reference.threshold_gate_up`."""
    if zeros_out is not None:
        _count_zeros(x, threshold.to(x.device), zeros_out)
    if (gate_bias is None) != (up_bias is None):  # the kernel adds both or neither
        present = gate_bias if gate_bias is not None else up_bias
        gate_bias = torch.zeros_like(present) if gate_bias is None else gate_bias
        up_bias = torch.zeros_like(present) if up_bias is None else up_bias
    gate, up = threshold_project(x, [gate_t, up_t], [gate_bias, up_bias], threshold)
    return gate, up
