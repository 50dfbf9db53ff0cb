"""Fixed-size streaming accumulators of FFN activation statistics, one per layer.

Shape legend:
    B: blocks in a batch, T: tokens per block, N = B*T tokens, F: FFN width (d_ff),
    P: contribution shares, C: chunk sizes, K: |h| histogram bins (ABS_HISTOGRAM_BINS),
    S: sampled tokens of the activation patterns (ProfileConfig.pattern_tokens)

Every statistic is a float64 sum over tokens (counts, sums of fractions, histograms), so its size
does not depend on the number of tokens, sums of shards equal the whole (the distributed all-reduce
is a plain sum) and nothing per token is kept. The one exception is the optional (F, S) float32
activation-pattern sample: S tokens, fixed in advance (see :mod:`moefy.profiling.patterns`).

The |h| histogram bins a float32 by the top 16 bits of its bit pattern (sign, 8 exponent bits,
7 mantissa bits): every binade [2^e, 2^(e+1)) is cut into 128 equal bins, so a bin's width is
1/128 to 1/256 of its values (0.4-0.8 %) over the whole float32 range, with no range to choose.
Fractions of |h| below any value are read from it with linear interpolation inside one bin.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from moefy.dist import all_reduce_sum_
from moefy.profiling.config import ProfileConfig
from moefy.profiling.patterns import pattern_slots, top_count

ABS_HISTOGRAM_SHIFT = 16  # bits dropped from the float32 pattern: keeps 7 of 23 mantissa bits
ABS_HISTOGRAM_BINS = 1 << (31 - ABS_HISTOGRAM_SHIFT)  # 32768: |h| >= 0, so the sign bit is 0
_BOOLS_PER_WORD = 8  # bools per int64 word when OR-ing active masks
# the smallest float32 above 0: a top threshold is at least this, so h = 0 is never top
_SMALLEST_POSITIVE = float(torch.nextafter(torch.tensor(0.0), torch.tensor(1.0)))


def abs_histogram_edges() -> torch.Tensor:
    """(K+1,) float64 bin edges of the |h| histogram; bin j holds ``edges[j] <= |h| < edges[j+1]``.

    Bin 0 holds exact zeros (and float32 values below 1e-40). The bins of float32 inf and NaN have
    non-finite edges.
    """
    patterns = torch.arange(ABS_HISTOGRAM_BINS + 1, dtype=torch.int64) << ABS_HISTOGRAM_SHIFT
    patterns[-1] = (1 << 31) - 1  # keep the last edge inside int32: it is the largest NaN anyway
    return patterns.to(torch.int32).view(torch.float32).double()


def _edge(j: int) -> float:
    """Lower edge of |h| histogram bin j: the float32 whose bit pattern is ``j << SHIFT``."""
    pattern = min(j << ABS_HISTOGRAM_SHIFT, (1 << 31) - 1)
    return struct.unpack("<f", struct.pack("<I", pattern))[0]


def fraction_below(histogram: torch.Tensor, value: float) -> float:
    """Fraction of the values counted in an |h| ``histogram`` that are below ``value``.

    Exact up to the one bin that holds ``value``, whose count is split linearly.

    Args:
        histogram: (K,) counts, as accumulated by :class:`LayerAccumulator`.
        value: a finite value >= 0.

    Returns:
        A fraction in [0, 1] (0 for an empty histogram).

    Example:
        >>> fraction_below(acc.abs_histogram, 0.1 * rms)
    """
    histogram = histogram.double().cpu()
    total = float(histogram.sum())
    if total == 0.0 or value <= 0.0:
        return 0.0
    value = min(value, torch.finfo(torch.float32).max)
    pattern = struct.unpack("<I", struct.pack("<f", value))[0]
    j = min(pattern >> ABS_HISTOGRAM_SHIFT, ABS_HISTOGRAM_BINS - 1)
    lower, upper = _edge(j), _edge(j + 1)
    inside = float(histogram[j]) * min(max((value - lower) / (upper - lower), 0.0), 1.0)
    return (float(histogram[:j].sum()) + inside) / total


def histogram_quantile(histogram: torch.Tensor, q: float) -> float:
    """The value below which a fraction ``q`` of the counted |h| lie (linear inside a bin).

    Args:
        histogram: (K,) counts of an |h| histogram.
        q: a fraction in [0, 1].

    Returns:
        The quantile (``nan`` for an empty histogram).
    """
    histogram = histogram.double().cpu()
    total = float(histogram.sum())
    if total == 0.0:
        return float("nan")
    cumulative = histogram.cumsum(0)  # (K,)
    target = q * total
    j = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=torch.float64)).item())
    j = min(j, ABS_HISTOGRAM_BINS - 1)
    below = float(cumulative[j - 1]) if j > 0 else 0.0
    inside = float(histogram[j])
    share = (target - below) / inside if inside > 0 else 0.0
    return _edge(j) + share * (_edge(j + 1) - _edge(j))


@dataclass
class TokenBatch:
    """What an active rule may look at, for N tokens of one layer.

    Attributes:
        magnitude: (N, F) float32 |h|.
        contribution: (N, F) float32 ``c = |h| * ||W_down[:, i]||``.
        contribution_ascending: (N, F) ``contribution`` sorted ascending in each row.
        needed_for_active_share: (N,) int64 neurons in the smallest set carrying
            ``active_share`` of the contribution mass.
        token_norm: (N,) float32 L2 norm of h per token.
    """

    magnitude: torch.Tensor
    contribution: torch.Tensor
    contribution_ascending: torch.Tensor
    needed_for_active_share: torch.Tensor
    token_norm: torch.Tensor


def _contribution_rule(batch: TokenBatch, config: ProfileConfig) -> torch.Tensor:
    needed = batch.needed_for_active_share  # (N,)
    F = batch.contribution.shape[1]
    # the weakest neuron of the set is the needed-th largest, at ascending position F - needed
    cutoff = batch.contribution_ascending.gather(
        1, (F - needed).clamp(max=F - 1)[:, None]
    )  # (N, 1)
    cutoff = cutoff.masked_fill(needed[:, None] == 0, float("inf"))  # h == 0: nothing is active
    return batch.contribution >= cutoff  # (N, F)


def _nonzero_rule(batch: TokenBatch, config: ProfileConfig) -> torch.Tensor:
    return batch.magnitude != 0  # (N, F)


def _magnitude_rule(batch: TokenBatch, config: ProfileConfig) -> torch.Tensor:
    F = batch.magnitude.shape[1]
    token_rms = batch.token_norm / F**0.5  # (N,)
    return batch.magnitude > (config.active_threshold * token_rms)[:, None]  # (N, F)


ActiveRule = Callable[[TokenBatch, ProfileConfig], torch.Tensor]

# config.active_rule -> (tokens, config) -> (N, F) bool active mask
ACTIVE_RULES: dict[str, ActiveRule] = {
    "contribution": _contribution_rule,
    "nonzero": _nonzero_rule,
    "magnitude": _magnitude_rule,
}


@functools.cache
def _thread_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moefy-profile")


def sort_and_bin(
    contribution: torch.Tensor, magnitude: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two costly steps of an update: sort each token's contributions, bin every |h|.

    On CPU they run split by rows over ``torch.get_num_threads()`` threads (numpy and torch
    release the GIL), with numpy's SIMD sort, 3-7x faster than ``torch.sort`` there; and
    ``torch.bincount`` runs on one thread only. Elsewhere both are plain torch.

    Args:
        contribution: (N, F) float32 ``|h| * ||W_down[:, i]||``.
        magnitude: (N, F) contiguous float32 |h|.

    Returns:
        ``(ascending, histogram)``: (N, F) ``contribution`` sorted ascending in each row (a new
        tensor), and the (K,) int64 counts of |h| per histogram bin.
    """
    if contribution.device.type != "cpu":
        patterns = (magnitude.view(torch.int32) >> ABS_HISTOGRAM_SHIFT).view(-1)  # (N * F,)
        histogram = torch.bincount(patterns, minlength=ABS_HISTOGRAM_BINS)
        return torch.sort(contribution, dim=1).values, histogram
    ascending = contribution.clone()  # (N, F), sorted in place below
    rows = ascending.numpy()
    patterns = magnitude.view(torch.int32)  # (N, F) float32 bit patterns

    def work(part: slice) -> torch.Tensor:
        rows[part].sort(axis=1)
        return torch.bincount(
            (patterns[part] >> ABS_HISTOGRAM_SHIFT).view(-1), minlength=ABS_HISTOGRAM_BINS
        )

    counts = _map_row_parts(rows.shape[0], work)
    return ascending, torch.stack(counts).sum(0)


def top_thresholds(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of each row (on CPU: numpy's partition, split over threads).

    Args:
        magnitude: (N, F) contiguous float32 |h|.
        k: the rank, in [1, F].

    Returns:
        (N,) float32 thresholds: row n's top k are the entries ``>= thresholds[n]``.

    Example:
        >>> top_thresholds(torch.tensor([[3.0, 1.0, 2.0]]), 2)
        tensor([2.])
    """
    F = magnitude.shape[1]
    if magnitude.device.type != "cpu":
        return torch.kthvalue(magnitude, F - k + 1, dim=1).values
    rows = magnitude.numpy()

    def work(part: slice) -> torch.Tensor:
        return torch.from_numpy(np.partition(rows[part], F - k, axis=1)[:, F - k])

    return torch.cat(_map_row_parts(rows.shape[0], work))


def _map_row_parts(num_rows: int, work: Callable[[slice], torch.Tensor]) -> list[torch.Tensor]:
    """``work`` on consecutive row ranges, one per thread (torch's thread count), in order."""
    workers = max(1, min(torch.get_num_threads(), num_rows))
    bounds = np.linspace(0, num_rows, workers + 1).astype(int)
    parts = [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]
    return list(_thread_pool(workers).map(work, parts)) if workers > 1 else [work(parts[0])]


class LayerAccumulator:
    """Streaming statistics of one FFN layer's neuron activations h.

    Args:
        neuron_norms: (F,) ``||W_down[:, i]||``, on the device the activations arrive on.
        config: what to measure.
        pattern_positions: (S,) sorted global indices of the tokens whose contribution shares
            are kept as activation patterns (:func:`moefy.profiling.patterns.pattern_positions`),
            or None to keep none.

    Example:
        >>> acc = LayerAccumulator(site.weights().neuron_norms(), ProfileConfig())
        >>> acc.update(h)  # (B, T, F), once per batch
        >>> acc.all_reduce_()
        >>> acc.tensors()["firing_counts"]  # (F,)
    """

    def __init__(
        self,
        neuron_norms: torch.Tensor,
        config: ProfileConfig,
        pattern_positions: torch.Tensor | None = None,
    ) -> None:
        self.config = config
        self.neuron_norms = neuron_norms.detach().float().contiguous()  # (F,)
        self.d_ff = F = self.neuron_norms.shape[0]
        device = self.neuron_norms.device
        self._rule = ACTIVE_RULES[config.active_rule]
        # the active share is looked up with the reported shares in one search
        self._share_targets = torch.tensor(
            [1.0 - p for p in (*config.shares, config.active_share)],
            dtype=torch.float32,
            device=device,
        )  # (P + 1,)

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        P, C = len(config.shares), len(config.chunk_sizes)
        self.sums: dict[str, torch.Tensor] = {
            "tokens": zeros(),
            "exact_zeros": zeros(),
            "sum_squares": zeros(),
            "abs_histogram": zeros(ABS_HISTOGRAM_BINS),  # (K,)
            "contribution_needed": zeros(P),  # (P,) sum over tokens of neurons needed for share p
            "contribution_low_share": zeros(F),  # (F,) sum of the share carried by the j+1 weakest
            "active_count_histogram": zeros(F + 1),  # (F+1,) tokens with 0..F active neurons
            "firing_counts": zeros(F),  # (F,) tokens for which neuron i is active
            "chunk_union": zeros(C),  # (C,) sum over chunks of neurons active in the chunk
            "chunk_count": zeros(C),  # (C,) chunks seen
            "top_counts": zeros(F),  # (F,) tokens for which neuron i is among the top |h|
            "contribution_share": zeros(F),  # (F,) sum over tokens of c_i / sum(c)
        }
        if config.coactivation:
            self.sums["coactivation"] = zeros(F, F)  # (F, F) tokens with both i and j active
        self._top_k = top_count(config.top_share, F)
        self._tokens_seen = 0  # global index of the next token when update gets none
        self.pattern_positions: torch.Tensor | None = None
        self.patterns: torch.Tensor | None = None  # (F, S) float32 c_i / sum(c) per sampled token
        if pattern_positions is not None and pattern_positions.numel() > 0:
            self.pattern_positions = pattern_positions.to(device=device, dtype=torch.int64)
            self.patterns = torch.zeros(F, pattern_positions.numel(), device=device)

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulators (constant: independent of the tokens seen)."""
        held = [*self.sums.values(), *([] if self.patterns is None else [self.patterns])]
        return sum(t.numel() * t.element_size() for t in held)

    @torch.no_grad()
    def update(self, h: torch.Tensor, token_index: torch.Tensor | None = None) -> None:
        """Add one batch of activations.

        Args:
            h: (B, T, F) neuron activations of B blocks of T consecutive tokens.
            token_index: (B*T,) global index of each token (row-major over (B, T)), which
                decides the tokens kept as activation patterns; None: the tokens follow those
                of the previous updates (one process, blocks in order).
        """
        B, T, F = h.shape
        N = B * T
        if token_index is None:
            token_index = torch.arange(self._tokens_seen, self._tokens_seen + N)
        self._tokens_seen += N
        sums = self.sums
        magnitude = h.reshape(N, F).float().abs()  # (N, F), a fresh contiguous float32 tensor
        token_norm = torch.linalg.vector_norm(magnitude, dim=1)  # (N,)
        sums["tokens"] += N
        sums["exact_zeros"] += N * F - torch.count_nonzero(magnitude)
        sums["sum_squares"] += token_norm.double().square().sum()

        contribution = magnitude * self.neuron_norms  # (N, F)
        ascending, histogram = sort_and_bin(contribution, magnitude)  # (N, F), (K,)
        sums["abs_histogram"] += histogram
        # share of the token's contribution mass carried by its j+1 weakest neurons
        low_share = ascending.cumsum(1)  # (N, F)
        self._update_shares(contribution, low_share[:, -1], token_index)
        low_share /= low_share[:, -1:].clamp_min(torch.finfo(torch.float32).tiny)
        # dropping the m weakest neurons keeps share p while their low share is <= 1 - p
        targets = self._share_targets.expand(N, -1).contiguous()  # (N, P + 1)
        dropped = torch.searchsorted(low_share, targets, right=True)  # (N, P + 1)
        needed = F - dropped  # (N, P + 1); 0 for a token whose h is all zero
        sums["contribution_needed"] += needed[:, :-1].sum(0)
        ones = low_share.new_ones(1, N)  # (1, N): column sums as a matmul, far faster on CPU
        sums["contribution_low_share"] += (ones @ low_share).view(F)
        del low_share

        # a neuron is top when |h| reaches the token's k-th largest and is not 0
        threshold = top_thresholds(magnitude, self._top_k).clamp_min_(_SMALLEST_POSITIVE)  # (N,)
        top = (magnitude >= threshold[:, None]).float()  # (N, F)
        sums["top_counts"] += (ones @ top).view(F)
        del top
        tokens = TokenBatch(magnitude, contribution, ascending, needed[:, -1], token_norm)
        active = self._rule(tokens, self.config)  # (N, F) bool
        del tokens, ascending, contribution, magnitude
        mask = active.float()  # (N, F); float32 sums of 0/1 are exact below 2**24
        active_count = (mask @ mask.new_ones(F)).long()  # (N,)
        sums["active_count_histogram"] += torch.bincount(active_count, minlength=F + 1)
        sums["firing_counts"] += (ones @ mask).view(F)
        self._update_chunks(active.view(B, T, F), int(active_count.sum()))
        if "coactivation" in sums:
            sums["coactivation"] += mask.T @ mask  # (F, F)

    def _update_shares(
        self, contribution: torch.Tensor, total: torch.Tensor, token_index: torch.Tensor
    ) -> None:
        """Add each token's contribution shares ``c_i / sum(c)``; keep the sampled tokens' ones.

        Args:
            contribution: (N, F) ``c``.
            total: (N,) ``sum(c)`` of each token.
            token_index: (N,) global token indices.
        """
        inverse = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))  # (N,); h = 0: 0
        F = contribution.shape[1]
        self.sums["contribution_share"] += (inverse[None, :] @ contribution).view(F)
        if self.patterns is None:
            return
        rows, slots = pattern_slots(self.pattern_positions, token_index)  # (M,), (M,)
        if rows.numel():
            rows = rows.to(contribution.device)
            shares = contribution[rows] * inverse[rows, None]  # (M, F)
            self.patterns[:, slots] = shares.T

    def _update_chunks(self, active: torch.Tensor, total_active: int) -> None:
        """Union of the active sets over non-overlapping chunks of n tokens.

        Args:
            active: (B, T, F) bool active mask.
            total_active: its number of True entries (the sum for n = 1).
        """
        B, T, F = active.shape
        # OR eight neurons at once by reading the bool mask as int64 words
        packed = active.view(torch.int64) if F % _BOOLS_PER_WORD == 0 else active
        unions = {1: packed}  # n -> (B, T // n, W): union over each chunk of n tokens
        for c, n in enumerate(self.config.chunk_sizes):
            chunks = T // n
            if chunks == 0:
                continue
            self.sums["chunk_count"][c] += B * chunks
            if n == 1:
                self.sums["chunk_union"][c] += total_active
                continue
            # build n-token unions from the largest smaller ones that tile them
            base = max(m for m in unions if n % m == 0)
            group = n // base
            parts = unions[base][:, : chunks * group].unflatten(
                1, (chunks, group)
            )  # (B, chunks, group, W)
            union = parts[:, :, 0].clone() if group > 1 else parts[:, :, 0]  # (B, chunks, W)
            for i in range(1, group):
                union |= parts[:, :, i]
            unions[n] = union
            self.sums["chunk_union"][c] += torch.count_nonzero(union.view(torch.bool))

    def all_reduce_(self) -> None:
        """Sum the accumulators over ranks (no-op outside torch.distributed)."""
        for name in self.sums:  # same order on every rank
            all_reduce_sum_(self.sums[name])
        if self.patterns is not None:
            # each sampled token lives on one rank, zeros elsewhere: the sum gathers them exactly
            all_reduce_sum_(self.patterns)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The accumulated sums on CPU, float64, by name."""
        return {name: t.detach().cpu() for name, t in self.sums.items()}

    def pattern_tensor(self) -> torch.Tensor | None:
        """The (F, S) float32 activation patterns on CPU, or None when none are kept."""
        return None if self.patterns is None else self.patterns.detach().cpu()
