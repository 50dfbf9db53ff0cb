"""What the Triton kernels share: compiled or interpreted launches, grid sizes, the split-K reduce.

Shape legend:
    P: split programs whose partial sums are added, N: tokens, C: output columns

Kernels are ``@triton.jit`` functions like any others. Whether they run compiled (CUDA tensors)
or interpreted (CPU tensors) is decided once per process: triton reads ``TRITON_INTERPRET`` when
it, and each module of kernels, is imported (its own library too: ``tl.zeros``, ``tl.sum``), so
one process cannot have both; :func:`kernel` says so in one line instead of failing deep inside.

This module imports triton: only the Triton kernels import it, and they are imported only when
a Triton kernel runs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from moefy.errors import MoefyError

INTERPRET_ENV = "TRITON_INTERPRET"
# Programs per streaming multiprocessor the split-K grids aim for: enough CTAs in flight to
# cover memory latency on a memory-bound GEMV (an SM runs several at once, overlapping loads).
PROGRAMS_PER_SM = 4
# Under the interpreter every program runs one after another in numpy: keep grids small (tests
# force larger splits where they need them).
INTERPRETED_PROGRAMS = 4
REDUCE_BLOCK = 1024
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_active() -> bool:
    """Whether triton was imported in interpreter mode (its library functions interpreted)."""
    return isinstance(tl.zeros, InterpretedFunction)


def kernel(fn, device: torch.device):
    """The jitted ``fn``, checked to suit tensors on ``device`` in this process.

    Raises:
        MoefyError: CUDA tensors in an interpreting process, or CPU tensors in a compiling one.
    """
    interpreted = device.type != "cuda"
    if interpreted != interpreter_active():
        wanted = "set" if interpreted else "unset"
        raise MoefyError(
            f"triton kernels on {device.type} tensors need {INTERPRET_ENV}=1 {wanted} before "
            "triton is imported (it decides once per process whether to interpret)"
        )
    return fn


def target_programs(device: torch.device) -> int:
    """How many programs a split-K grid should have on ``device``."""
    if device.type != "cuda":
        return INTERPRETED_PROGRAMS
    return PROGRAMS_PER_SM * _multiprocessors(device.index or torch.cuda.current_device())


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_rows(
    rows: int, columns_programs: int, block: int, device: torch.device, splits: int | None = None
) -> tuple[int, int]:
    """Rows per split and split count so ``columns_programs * splits`` nears the program count
    a split-K grid should have on ``device`` (:func:`target_programs`), or ``splits`` given.

    Each split takes a whole number of ``block`` rows; the last may take fewer.

    Example:
        >>> split_rows(14336, 32, 64, torch.device("cuda"), splits=16)
        (896, 16)
    """
    target = target_programs(device) if splits is None else splits * columns_programs
    wanted = max(1, min(triton.cdiv(target, max(1, columns_programs)), triton.cdiv(rows, block)))
    per_split = triton.cdiv(triton.cdiv(rows, wanted), block) * block
    return per_split, triton.cdiv(rows, per_split)


def dot_in_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether tile products should run on fp32 operands.

    float32 weights: exact ``ieee`` products, not tf32. The interpreter multiplies bf16 tiles as
    their raw 16-bit patterns, so it gets fp32 operands for every dtype.
    """
    return dtype == torch.float32 or device.type != "cuda"


def scratch(*shape: int, device: torch.device) -> torch.Tensor:
    """An uninitialised float32 work buffer (every element the kernels read, they wrote)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


@triton.jit
def accumulate(acc, a, b, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc (BLOCK_N, M) + a (BLOCK_N, K) @ b (K, M) in float32.

    Batch 1 multiplies and sums (tile products need 16 rows); otherwise a tile product, on fp32
    operands when ``DOT_FP32`` (see :func:`dot_in_fp32`).
    """
    if BLOCK_N == 1:
        return acc + tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    elif DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b, acc)


@triton.jit
def _reduce_partials_kernel(
    part_ptr,
    part2_ptr,
    bias_ptr,
    bias2_ptr,
    out_ptr,
    out2_ptr,
    numel,
    columns,
    SPLITS: tl.constexpr,
    PAIR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out = sum over P of part (P, N, C) [+ bias (C,)], cast to out's dtype; PAIR: twice."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(0, SPLITS):
        base = split * numel  # P * N * C stays far under 2**31
        acc += tl.load(part_ptr + base + offs, mask=ok, other=0.0)
        if PAIR:
            acc2 += tl.load(part2_ptr + base + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % columns, mask=ok, other=0.0).to(tl.float32)
        if PAIR:
            acc2 += tl.load(bias2_ptr + offs % columns, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)
    if PAIR:
        tl.store(out2_ptr + offs, acc2.to(out2_ptr.dtype.element_ty), mask=ok)


def reduce_partials(
    partials: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    outs: list[torch.Tensor],
) -> None:
    """Write ``outs[j] = partials[j].sum(0) + biases[j]`` (one or two of each) in one launch.

    Args:
        partials: (P, N, C) float32 each.
        biases: (C,) or None each (all None or none None).
        outs: (N, C) contiguous each, written in their own dtype.
    """
    first = partials[0]
    splits, rows, columns = first.shape
    pair = len(partials) == 2
    has_bias = biases[0] is not None
    second = partials[-1]
    numel = rows * columns
    kernel(_reduce_partials_kernel, first.device)[(triton.cdiv(numel, REDUCE_BLOCK),)](
        first,
        second,
        biases[0] if has_bias else first,
        biases[-1] if has_bias else first,
        outs[0],
        outs[-1],
        numel,
        columns,
        SPLITS=splits,
        PAIR=pair,
        HAS_BIAS=has_bias,
        BLOCK=REDUCE_BLOCK,
    )
