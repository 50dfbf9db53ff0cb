"""What the expert size costs: the same FFN cut into experts of S neurons, the same share kept.

Shape legend:
    N: tokens (batch), D: model width, F: FFN width, E: experts (F / S), S: neurons per expert

For one gated (SiLU) FFN shape (default: the default model's, 576 -> 1536), each expert size S
cuts the same dense weights into E = F / S contiguous experts; each token runs the same share
``keep`` of them, drawn at random (speed does not depend on which). Every variant of one batch
is timed round-robin with torch's dense FFN in the same rounds (:func:`interleaved_medians`):

- ``kernel``: :func:`moefy.kernels.expert_ffn` on the C++ backend; at batches above
  :data:`moefy.kernels.SMALL_BATCH_MAX` (where :func:`moefy.kernels.kernel_fits` gives the call
  to torch) it is fed ``SMALL_BATCH_MAX`` tokens per call, as a caller that wants the kernel must;
- ``grouped`` (batches above ``SMALL_BATCH_MAX`` only): what a :class:`moefy.moe.MoEFFN` layer
  runs at that batch, grouped dispatch in torch (one small GEMM pair per selected expert).

Weights are replicated into enough layer copies to span a few last-level caches, cycled call by
call, so every call reads its weights from DRAM as a real model's layers do.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from moefy.bench.bandwidth import last_level_cache_bytes
from moefy.bench.ffn import DenseCopies
from moefy.bench.timing import interleaved_medians
from moefy.errors import MoefyError
from moefy.kernels import SMALL_BATCH_MAX, Backend, expert_ffn

ACT = "silu"
D_MODEL, D_FF = 576, 1536  # SmolLM2-135M's FFN
EXPERT_SIZES = (8, 16, 32, 64)
KEEPS = (0.25, 0.5)
BATCHES = (1, 64)
# Layer copies span this many last-level caches: enough that no call finds its weights cached,
# few enough that the four layouts of every copy stay small (about 0.4 GB at the default shape).
CACHE_SPAN = 2
DENSE = "dense"


def _copies(d_model: int, d_ff: int) -> int:
    dense_bytes = 3 * d_model * d_ff * 4  # gate, up, down in float32
    return max(1, math.ceil(CACHE_SPAN * last_level_cache_bytes() / dense_bytes))


def expert_weights(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, expert_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense gated-FFN weights in the kernels' expert-major layout, neurons in dense order.

    Args:
        gate, up: (F, D) input projections.
        down: (D, F) output projection.
        expert_size: S, a divisor of F.

    Returns:
        ``(w_in, w_out)``: (E, 2S, D) gate rows then up rows per expert, and (E, S, D) the
        down projection transposed.

    Example:
        >>> w_in, w_out = expert_weights(gate, up, down, 16)
    """
    F, D = gate.shape
    if F % expert_size:
        raise MoefyError(f"expert size {expert_size} does not divide d_ff={F}")
    E = F // expert_size
    w_in = torch.cat([gate.reshape(E, expert_size, D), up.reshape(E, expert_size, D)], dim=1)
    w_out = down.t().reshape(E, expert_size, D).contiguous()  # (E, S, D)
    return w_in.contiguous(), w_out  # (E, 2S, D), (E, S, D)


def random_selection(
    batch: int, num_experts: int, keep: float, gen: torch.Generator
) -> torch.Tensor:
    """(N, E) bool: each token runs ``round(keep * E)`` (at least one) experts drawn at random."""
    k = max(1, round(keep * num_experts))
    scores = torch.rand(batch, num_experts, generator=gen)  # (N, E)
    mask = torch.zeros(batch, num_experts, dtype=torch.bool)
    return mask.scatter_(1, scores.topk(k, dim=1).indices, True)


class _Copies(DenseCopies):
    """``count`` random dense layers of one shape, cycled call by call, in any expert size."""

    def layouts(self, expert_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            expert_weights(self.gate[i], self.up[i], self.down[i], expert_size)
            for i in range(self.count)
        ]


def kernel_call(
    x: torch.Tensor, mask: torch.Tensor, layouts: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> Callable[[], torch.Tensor]:
    """The C++ expert kernel on ``x`` (N, D), at most ``SMALL_BATCH_MAX`` tokens per call."""
    order = itertools.cycle(layouts)

    def kernel() -> torch.Tensor:
        w_in, w_out = next(order)
        parts = [
            expert_ffn(x_part, m_part, w_in, w_out, None, None, ACT, True, backend=Backend.CPU)
            for x_part, m_part in zip(
                x.split(SMALL_BATCH_MAX), mask.split(SMALL_BATCH_MAX), strict=True
            )
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)  # (N, D)

    return kernel


def grouped_call(
    x: torch.Tensor, mask: torch.Tensor, layouts: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> Callable[[], torch.Tensor]:
    """What a :class:`moefy.moe.MoEFFN` runs on ``x`` (N, D) with selection ``mask`` (N, E)."""
    from moefy.moe.module import MoEFFN

    layers = []
    for w_in, w_out in layouts:
        E, S, D = w_out.shape
        moe = MoEFFN(D, E, S, gated=True, act=nn.SiLU())
        moe.w_in = nn.Parameter(w_in, requires_grad=False)  # shares the copy's memory
        moe.w_out = nn.Parameter(w_out, requires_grad=False)
        layers.append(moe.eval())
    order = itertools.cycle(layers)

    def grouped() -> torch.Tensor:
        moe = next(order)
        moe.select_next(mask)
        return moe(x)  # (N, D)

    return grouped


def run_expert_size_bench(
    *,
    threads: int,
    rounds: int,
    d_model: int = D_MODEL,
    d_ff: int = D_FF,
    expert_sizes: Sequence[int] = EXPERT_SIZES,
    keeps: Sequence[float] = KEEPS,
    batches: Sequence[int] = BATCHES,
    copies: int | None = None,
    seed: int = 0,
) -> list[dict[str, object]]:
    """Tokens per second of the expert kernel at each expert size, against dense in the same run.

    Args:
        threads: the torch thread count in force (recorded in the rows).
        rounds: timed calls per variant.
        d_model, d_ff: the FFN shape (D, F); every expert size must divide F.
        expert_sizes: the S to compare.
        keeps: shares of the experts each token runs.
        batches: token counts per call.
        copies: layer copies cycled through (default: enough to span a few last-level caches).
        seed: of the weights, tokens and selections.

    Returns:
        One row per (batch, S, keep, path): ``tokens_per_s`` and the dense FFN's in the same
        rounds, ``vs_dense`` (their ratio), ``union`` (share of experts some token of the batch
        runs, so whose weights are read).

    Example:
        >>> rows = run_expert_size_bench(threads=1, rounds=5)
        >>> {(r["batch"], r["expert_size"], r["keep"]): r["vs_dense"] for r in rows}
    """
    bad = [s for s in expert_sizes if s < 1 or d_ff % s]
    if bad:
        raise MoefyError(f"expert sizes {bad} do not divide d_ff={d_ff}")
    if any(not 0.0 < keep <= 1.0 for keep in keeps):
        raise MoefyError(f"keeps must be in (0, 1], got {tuple(keeps)}")
    gen = torch.Generator().manual_seed(seed)
    dense_copies = _Copies(d_model, d_ff, copies or _copies(d_model, d_ff), seed)
    layouts = {size: dense_copies.layouts(size) for size in expert_sizes}
    rows: list[dict[str, object]] = []
    for batch in batches:
        x = torch.randn(batch, d_model, generator=gen)  # (N, D)
        variants: dict[str, Callable[[], torch.Tensor]] = {DENSE: dense_copies.dense_call(x)}
        described: dict[str, dict[str, object]] = {}
        for size, keep in itertools.product(expert_sizes, keeps):
            mask = random_selection(batch, d_ff // size, keep, gen)  # (N, E)
            paths = {"kernel": kernel_call}
            if batch > SMALL_BATCH_MAX:
                paths["grouped"] = grouped_call
            for path, build in paths.items():
                name = f"{path}/S={size}/keep={keep}"
                variants[name] = build(x, mask, layouts[size])
                described[name] = {
                    "expert_size": size,
                    "experts": d_ff // size,
                    "keep": keep,
                    "path": path,
                    "union": float(mask.any(0).float().mean()),
                }
        medians = interleaved_medians(variants, rounds=rounds)
        dense_rate = batch / medians[DENSE]
        for name, about in described.items():
            rate = batch / medians[name]
            rows.append(
                {
                    "threads": threads,
                    "shape": f"{d_model}->{d_ff}",
                    "batch": batch,
                    **about,
                    "tokens_per_s": rate,
                    "dense_tokens_per_s": dense_rate,
                    "vs_dense": rate / dense_rate,
                }
            )
    return rows
