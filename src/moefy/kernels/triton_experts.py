"""Triton expert-block FFN (the ``MoEFFN`` layout) for CUDA tensors.

Shape legend:
    N: tokens (1..16), D: model width, E: experts, S: slots per expert, S_in: input rows per
    expert (2S gated: gate rows then up rows; S otherwise), P: splits of the experts

Two launches (three when the down projection is split), no host synchronisation, so a decode
step can be captured in a CUDA graph:

1. up: one program per (expert, block of slots). An expert no token selected returns at once;
   otherwise it reads its gate and up rows once for all tokens (coalesced along D), applies the
   activation and writes the hidden values (N, E, S) in float32, zero for tokens that did not
   select it.
2. down: one program per (block of D, group of experts); it walks its experts, skips the
   unselected ones, and reads each selected expert's down rows (E, S, D) once for all tokens.
   Groups write float32 partial sums that a last launch adds, with the bias, in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moefy.kernels import triton_launch as launch
from moefy.kernels.activations import ACTIVATIONS
from moefy.kernels.triton_launch import accumulate, scratch

BLOCK_S = 16  # slots per up program, and per step of the down loop (tile products need 16)
BLOCK_D_UP = 128  # width per step of the up loop: 256 contiguous bytes of a bf16 row
BLOCK_D_DOWN = 128  # output columns per down program
TOKEN_BLOCK = 16  # tile products need 16 rows; batch 1 reduces without them
NUM_WARPS = 4


@triton.jit
def _activate(a, ACT: tl.constexpr):
    """The activation of code ``ACT`` (:data:`moefy.kernels.activations.ACTIVATIONS`)."""
    if ACT == 0:  # relu
        return tl.maximum(a, 0.0)
    elif ACT == 1:  # silu
        return a / (1.0 + tl.exp(-a))
    elif ACT == 2:  # gelu_tanh, with 1 + tanh(z) = 2 / (1 + exp(-2z))
        inner = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        return 0.5 * a * (2.0 / (1.0 + tl.exp(-2.0 * inner)))
    else:  # gelu_erf
        return 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))


@triton.jit
def _expert_up_kernel(
    x_ptr,
    mask_ptr,
    w_in_ptr,
    b_in_ptr,
    hidden_ptr,
    N,
    E,
    S: tl.constexpr,
    D: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """hidden[n, e, s] = act(gate) * up (or act(up)) for tokens that chose e, else 0."""
    expert = tl.program_id(0)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    S_IN: tl.constexpr = 2 * S if GATED else S
    up_rows = offs_s + S if GATED else offs_s
    chosen = tl.load(mask_ptr + offs_n * E + expert, mask=n_ok, other=0) != 0  # (BLOCK_N,)
    if tl.max(chosen.to(tl.int32), axis=0) > 0:
        expert_rows = w_in_ptr + expert.to(tl.int64) * S_IN * D
        acc_up = tl.zeros((BLOCK_N, BLOCK_S), dtype=tl.float32)
        acc_gate = tl.zeros((BLOCK_N, BLOCK_S), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            x = tl.load(
                x_ptr + offs_n[:, None] * D + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)  # (BLOCK_N, BLOCK_D)
            w_mask = s_ok[:, None] & d_ok[None, :]
            w_up = tl.load(expert_rows + up_rows[:, None] * D + offs_d[None, :], mask=w_mask)
            acc_up = accumulate(acc_up, x, tl.trans(w_up), BLOCK_N, DOT_FP32)
            if GATED:
                w_gate = tl.load(expert_rows + offs_s[:, None] * D + offs_d[None, :], mask=w_mask)
                acc_gate = accumulate(acc_gate, x, tl.trans(w_gate), BLOCK_N, DOT_FP32)
        if HAS_BIAS:
            bias_row = b_in_ptr + expert * S_IN
            acc_up += tl.load(bias_row + up_rows, mask=s_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_gate += tl.load(bias_row + offs_s, mask=s_ok, other=0.0).to(tl.float32)[None, :]
        a = _activate(acc_gate if GATED else acc_up, ACT)
        hidden = a * acc_up if GATED else a
        hidden = tl.where(chosen[:, None], hidden, 0.0)
        cells = (offs_n[:, None] * E + expert) * S + offs_s[None, :]
        tl.store(hidden_ptr + cells, hidden, mask=n_ok[:, None] & s_ok[None, :])


@triton.jit
def _expert_down_kernel(
    hidden_ptr,
    mask_ptr,
    w_out_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,
    N,
    E,
    S: tl.constexpr,
    D,
    EXPERTS_PER_SPLIT: tl.constexpr,
    FINAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[n, d] (or a partial sum) = sum over selected e of hidden[n, e] @ w_out[e][:, d]."""
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    split = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for j in range(0, EXPERTS_PER_SPLIT):
        expert = split * EXPERTS_PER_SPLIT + j
        chosen = tl.load(mask_ptr + offs_n * E + expert, mask=n_ok & (expert < E), other=0)
        if tl.max((chosen != 0).to(tl.int32), axis=0) > 0:
            expert_rows = w_out_ptr + expert.to(tl.int64) * S * D
            for s0 in range(0, S, BLOCK_S):
                offs_s = s0 + tl.arange(0, BLOCK_S)
                s_ok = offs_s < S
                hidden = tl.load(
                    hidden_ptr + (offs_n[:, None] * E + expert) * S + offs_s[None, :],
                    mask=n_ok[:, None] & s_ok[None, :],
                    other=0.0,
                )  # (BLOCK_N, BLOCK_S) float32
                w = tl.load(
                    expert_rows + offs_s[:, None] * D + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )  # (BLOCK_S, BLOCK_D)
                acc = accumulate(acc, hidden, w, BLOCK_N, DOT_FP32)
    out_mask = n_ok[:, None] & d_ok[None, :]
    cells = offs_n[:, None] * D + offs_d[None, :]
    if FINAL:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + cells, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(part_ptr + split * N * D + cells, acc, mask=out_mask)


def expert_ffn(
    x: torch.Tensor,
    mask: torch.Tensor,
    *experts: object,
    out: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """(N, D) output over each token's selected experts; see :func:`reference.expert_ffn`.

    Args:
        x: (N, D) float16 / bfloat16 / float32, N in 1..16.
        mask: (N, E) bool or integer, the experts each token runs.
        *experts: ``w_in, w_out, b_in, b_out, act, gated`` as the reference's (typed there):
            w_in: (E, S_in, D) contiguous, x's dtype.
            w_out: (E, S, D) contiguous, x's dtype.
            b_in: (E, S_in) or None.
            b_out: (D,) or None.
            act: a name of :data:`moefy.kernels.activations.ACTIVATIONS`.
            gated: ``act(gate) * up`` when True.
        out: a preallocated (N, D) output (tests poison it); default a new tensor.
        splits: groups of experts in the down launch (default: enough programs for the device).

    Returns:
        (N, D) in x's dtype.
    """
    w_in, w_out, b_in, b_out, act, gated = experts
    N, D = x.shape
    E, S_in, _ = w_in.shape
    S = w_out.shape[1]
    device = x.device
    x = x.contiguous()
    mask = mask.to(device=device, dtype=torch.bool).contiguous().view(torch.uint8)  # (N, E)
    if out is None:
        out = torch.empty(N, D, dtype=x.dtype, device=device)
    hidden = scratch(N, E, S, device=device)  # rows of unselected experts stay unwritten
    dot_fp32 = launch.dot_in_fp32(w_in.dtype, device)
    block_n = 1 if N == 1 else TOKEN_BLOCK
    launch.kernel(_expert_up_kernel, device)[(E, triton.cdiv(S, BLOCK_S))](
        x,
        mask,
        w_in,
        b_in if b_in is not None else hidden,
        hidden,
        N,
        E,
        S=S,
        D=D,
        GATED=bool(gated),
        HAS_BIAS=b_in is not None,
        ACT=ACTIVATIONS[act],
        DOT_FP32=dot_fp32,
        BLOCK_N=block_n,
        BLOCK_S=BLOCK_S,
        BLOCK_D=BLOCK_D_UP,
        num_warps=NUM_WARPS,
    )
    _down(hidden, mask, w_out, b_out, out, splits, dot_fp32, block_n)
    return out


def _down(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor | None,
    out: torch.Tensor,
    splits: int | None,
    dot_fp32: bool,
    block_n: int,
) -> None:
    """Write ``out`` (N, D) from the hidden values (N, E, S) and the down rows (E, S, D): one
    launch, or one per split of the experts plus the reduce."""
    N, E, S = hidden.shape
    D = out.shape[1]
    device = out.device
    column_programs = triton.cdiv(D, BLOCK_D_DOWN)
    experts_per_split, split_count = launch.split_rows(E, column_programs, 1, device, splits)
    final = split_count == 1
    partials = scratch(*((1,) if final else (split_count, N, D)), device=device)
    launch.kernel(_expert_down_kernel, device)[(column_programs, split_count)](
        hidden,
        mask,
        w_out,
        b_out if b_out is not None else partials,
        out,
        partials,
        N,
        E,
        S=S,
        D=D,
        EXPERTS_PER_SPLIT=experts_per_split,
        FINAL=final,
        HAS_BIAS=b_out is not None,
        DOT_FP32=dot_fp32,
        BLOCK_N=block_n,
        BLOCK_S=BLOCK_S,
        BLOCK_D=BLOCK_D_DOWN,
        num_warps=NUM_WARPS,
    )
    if not final:
        launch.reduce_partials([partials], [b_out], [out])
