"""FFN-level speed: torch's dense gated FFN against the sparse kernels on the same shapes.

Shape legend:
    N: tokens (batch), D: model width, F: FFN width, E: experts, S: slots per expert (F / E)

Weights are random (speed does not depend on their values) and, for small shapes, replicated
into enough layer copies to span several last-level caches, cycled call by call: a real model's
layers do not fit in cache either, so every call reads its weights from DRAM.

Variants per shape and batch, timed round-robin with the dense FFN:
- ``experts``: :func:`moefy.kernels.expert_ffn` with each token choosing a random ``active``
  share of the E experts;
- ``teal`` (batch 1 only): three :func:`moefy.kernels.threshold_linear` calls, with thresholds
  that keep an ``active`` share of the FFN's input and of its hidden activations.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as Fn

from moefy.bench.bandwidth import CACHE_MULTIPLE, last_level_cache_bytes
from moefy.bench.timing import interleaved_medians
from moefy.kernels import expert_ffn, threshold_linear

ACT = "silu"
WEIGHT_SCALE = 0.02


@dataclass(frozen=True)
class FFNShape:
    """A gated (SiLU) FFN: D, F and the number of experts it is split into."""

    name: str
    d_model: int
    d_ff: int
    num_experts: int

    @property
    def expert_size(self) -> int:
        return math.ceil(self.d_ff / self.num_experts)

    @property
    def dense_bytes(self) -> int:
        return 3 * self.d_model * self.d_ff * 4  # gate, up, down in float32


FFN_SHAPES = (
    FFNShape("smollm2 d=576", 576, 1536, 64),
    FFNShape("llama d=2048", 2048, 5632, 64),
    FFNShape("llama d=4096", 4096, 11008, 64),
)
BATCHES = (1, 4, 16)
ACTIVE_FRACTIONS = (0.5, 0.25, 0.125, 0.0625)


class DenseCopies:
    """``count`` random dense gated SiLU FFNs of one shape, cycled call by call (so no timed
    call finds its weights in cache).

    Attributes:
        gate, up: ``count`` (F, D) input projections each.
        down: ``count`` (D, F) output projections.
    """

    def __init__(self, d_model: int, d_ff: int, count: int, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)  # later layouts draw from it too
        self.gate = [self.weights(d_ff, d_model) for _ in range(count)]  # (F, D)
        self.up = [self.weights(d_ff, d_model) for _ in range(count)]  # (F, D)
        self.down = [self.weights(d_model, d_ff) for _ in range(count)]  # (D, F)
        self.count = count

    def weights(self, *size: int) -> torch.Tensor:
        """Uniform random weights in [-WEIGHT_SCALE, WEIGHT_SCALE] from this set's generator."""
        return torch.empty(size).uniform_(-WEIGHT_SCALE, WEIGHT_SCALE, generator=self.generator)

    def cycler(self) -> Callable[[], int]:
        """A call that returns the next copy's index, round robin."""
        order = itertools.cycle(range(self.count))
        return lambda: next(order)

    def dense_call(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """torch's dense gated FFN on ``x`` (N, D), one layer copy per call."""
        pick = self.cycler()

        def dense() -> torch.Tensor:
            i = pick()
            hidden = Fn.silu(Fn.linear(x, self.gate[i])) * Fn.linear(x, self.up[i])  # (N, F)
            return Fn.linear(hidden, self.down[i])  # (N, D)

        return dense


class _Layers(DenseCopies):
    """``copies`` random layers of one shape, in the dense and the expert-major layouts."""

    def __init__(self, shape: FFNShape, copies: int, seed: int) -> None:
        super().__init__(shape.d_model, shape.d_ff, copies, seed)
        D, E, S = shape.d_model, shape.num_experts, shape.expert_size
        self.down_t = [w.t().contiguous() for w in self.down]  # (F, D) for the teal kernel
        self.gate_t = [w.t().contiguous() for w in self.gate]  # (D, F)
        self.up_t = [w.t().contiguous() for w in self.up]  # (D, F)
        self.w_in = [self.weights(E, 2 * S, D) for _ in range(copies)]  # (E, 2S, D)
        self.w_out = [self.weights(E, S, D) for _ in range(copies)]  # (E, S, D)

    def experts_call(self, x: torch.Tensor, mask: torch.Tensor) -> Callable[[], torch.Tensor]:
        """The expert kernel on ``x`` (N, D) with selection ``mask`` (N, E)."""
        pick = self.cycler()

        def experts() -> torch.Tensor:
            i = pick()
            return expert_ffn(x, mask, self.w_in[i], self.w_out[i], None, None, ACT, True)

        return experts


def _copies_for(shape: FFNShape) -> int:
    return max(1, math.ceil(CACHE_MULTIPLE * last_level_cache_bytes() / shape.dense_bytes))


def _random_mask(batch: int, num_experts: int, k: int, gen: torch.Generator) -> torch.Tensor:
    mask = torch.zeros(batch, num_experts, dtype=torch.bool)  # (N, E)
    for token in range(batch):
        mask[token, torch.randperm(num_experts, generator=gen)[:k]] = True
    return mask


def _keep_threshold(values: torch.Tensor, active: float) -> torch.Tensor:
    """The |value| threshold that keeps the ``active`` share of ``values`` (strictly above it)."""
    return values.abs().flatten().quantile(1.0 - active).reshape(())


def run_ffn_bench(
    *,
    threads: int,
    bandwidth: float,
    rounds: int,
    shapes: Sequence[FFNShape] = FFN_SHAPES,
    batches: Sequence[int] = BATCHES,
    fractions: Sequence[float] = ACTIVE_FRACTIONS,
    seed: int = 0,
) -> list[dict[str, object]]:
    """Time dense against sparse FFNs at the current thread count.

    Args:
        threads: the torch thread count in force (recorded in the rows).
        bandwidth: measured read bandwidth in bytes/s at that count, for the limits.
        rounds: timed calls per variant.
        shapes, batches, fractions: what to time.
        seed: of the weights, tokens and selections.

    Returns:
        One row per (shape, batch, method, active): median times, the speed-up over dense, the
        speed-up the bandwidth allows for the bytes this variant reads, and the share of the
        measured bandwidth it reached.
    """
    rows: list[dict[str, object]] = []
    gen = torch.Generator().manual_seed(seed)
    for shape in shapes:
        layers = _Layers(shape, _copies_for(shape), seed)
        E, S, D = shape.num_experts, shape.expert_size, shape.d_model
        expert_bytes = 3 * S * D * 4
        for batch in batches:
            x = torch.randn(batch, D, generator=gen)  # (N, D)
            variants = {"dense": layers.dense_call(x)}
            bytes_read: dict[str, float] = {"dense": shape.dense_bytes}
            for active in fractions:
                k = max(1, round(active * E))
                mask = _random_mask(batch, E, k, gen)
                name = f"experts@{active}"
                variants[name] = layers.experts_call(x, mask)
                bytes_read[name] = int(mask.any(0).sum()) * expert_bytes
                if batch == 1:
                    variants[f"teal@{active}"], bytes_read[f"teal@{active}"] = _teal_variant(
                        layers, x, active, shape
                    )
            medians = interleaved_medians(variants, rounds=rounds)
            for name, seconds in medians.items():
                if name == "dense":
                    continue
                method, active = name.split("@")
                limit_seconds = bytes_read[name] / bandwidth
                rows.append(
                    {
                        "threads": threads,
                        "shape": shape.name,
                        "batch": batch,
                        "method": method,
                        "active": float(active),
                        "dense_ms": medians["dense"] * 1e3,
                        "sparse_ms": seconds * 1e3,
                        "speedup": medians["dense"] / seconds,
                        "limit_speedup": medians["dense"] / limit_seconds,
                        "of_bandwidth": limit_seconds / seconds,
                        "dense_of_bandwidth": shape.dense_bytes / bandwidth / medians["dense"],
                    }
                )
        del layers
    return rows


def _teal_variant(
    layers: _Layers, x: torch.Tensor, active: float, shape: FFNShape
) -> tuple[Callable[[], torch.Tensor], float]:
    """A TEAL FFN at one batch-1 token, and the weight bytes it reads."""
    x_threshold = _keep_threshold(x, active)
    kept_x = int((x.abs() > x_threshold).sum())
    h_thresholds, kept_h = [], 0
    for i in range(layers.count):  # each copy's hidden activations, for its own threshold
        hidden = Fn.silu(x @ layers.gate_t[i]) * (x @ layers.up_t[i])  # (1, F)
        h_thresholds.append(_keep_threshold(hidden, active))
        kept_h += int((hidden.abs() > h_thresholds[-1]).sum())
    pick = layers.cycler()

    def teal() -> torch.Tensor:
        i = pick()
        gate = threshold_linear(x, layers.gate_t[i], None, x_threshold)  # (1, F)
        up = threshold_linear(x, layers.up_t[i], None, x_threshold)
        h = Fn.silu(gate) * up
        return threshold_linear(h, layers.down_t[i], None, h_thresholds[i])  # (1, D)

    row_bytes = shape.d_ff * 4  # a gate or up row (I = D side) holds F floats
    return teal, 2 * kept_x * row_bytes + kept_h / layers.count * shape.d_model * 4
