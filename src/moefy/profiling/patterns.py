"""Activation rates and activation patterns: which tokens are sampled, how many neurons are "top".

Shape legend:
    N: tokens in a batch, F: FFN width (d_ff), T: sampled tokens (``ProfileConfig.pattern_tokens``)

Sampling rule: with n profiled tokens in all (known before profiling starts: the profiler is
given every block), the sampled tokens are the global token indices
``floor((k + 1/2) * n / T)`` for k = 0..T-1, T = min(pattern_tokens, n): evenly spaced, centred
in their strides, deterministic, and the same for every layer. A token's global index is
``block * block_len + position`` in the order of the blocks given to the profiler, so under
torch.distributed each rank fills the columns of the sampled tokens in its own shard and a sum
over ranks (zeros elsewhere) gathers the whole (F, T) array exactly.

On disk a pattern is stored as float16 of ``share * scale`` with ``scale = min(F, 2**15)``: the
shares of a token sum to 1, so the mean scaled value is about 1, inside float16's normal range
(plain float16 shares of a wide layer, around 1/F, would be subnormal and lose their precision).
"""

from __future__ import annotations

import math

import torch

# digits kept of top_share * F before rounding up, so 0.3 * 10 counts 3 neurons, not 4
_TOP_COUNT_DIGITS = 9
# largest scale of a stored pattern: share * scale <= scale stays below float16's max (65504)
_MAX_PATTERN_SCALE = 2**15


def top_count(top_share: float, d_ff: int) -> int:
    """How many neurons are "top" for each token: ``ceil(top_share * d_ff)``, at least 1.

    Args:
        top_share: the share p in (0, 1].
        d_ff: F, the number of neurons.

    Returns:
        k in [1, F].

    Example:
        >>> top_count(0.1, 1536)
        154
    """
    return max(1, min(d_ff, math.ceil(round(top_share * d_ff, _TOP_COUNT_DIGITS))))


def pattern_positions(n_tokens: int, pattern_tokens: int) -> torch.Tensor | None:
    """The global indices of the sampled tokens (see the module docstring for the rule).

    Args:
        n_tokens: n, the tokens profiled in all (over every rank).
        pattern_tokens: T asked for; fewer are sampled when n < T.

    Returns:
        (T,) int64 strictly increasing indices in [0, n), or None when none are sampled.

    Example:
        >>> pattern_positions(10, 4)
        tensor([1, 3, 6, 8])
    """
    count = min(pattern_tokens, n_tokens)
    if count <= 0:
        return None
    k = torch.arange(count, dtype=torch.int64)
    return ((2 * k + 1) * n_tokens) // (2 * count)  # floor((k + 1/2) * n / T), exact in int64


def pattern_slots(
    positions: torch.Tensor, token_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows of a batch are sampled tokens, and their columns in the (F, T) patterns.

    Args:
        positions: (T,) sorted global indices of the sampled tokens.
        token_index: (N,) global index of each row of the batch.

    Returns:
        ``(rows, slots)``: (M,) rows of the batch and (M,) their columns, M <= N.

    Example:
        >>> pattern_slots(torch.tensor([1, 3, 6, 8]), torch.arange(4))
        (tensor([1, 3]), tensor([0, 1]))
    """
    token_index = token_index.to(positions.device)
    slots = torch.searchsorted(positions, token_index).clamp_(max=positions.numel() - 1)  # (N,)
    sampled = positions[slots] == token_index  # (N,)
    return sampled.nonzero().view(-1), slots[sampled]


def pattern_scale(d_ff: int) -> float:
    """The factor a pattern of F neurons is multiplied by before it is stored as float16."""
    return float(min(d_ff, _MAX_PATTERN_SCALE))


def encode_patterns(patterns: torch.Tensor) -> torch.Tensor:
    """(F, T) float32 shares -> (F, T) float16 scaled shares, as stored on disk."""
    return (patterns.float() * pattern_scale(patterns.shape[0])).to(torch.float16).contiguous()


def decode_patterns(stored: torch.Tensor) -> torch.Tensor:
    """(F, T) float16 scaled shares, as stored on disk -> (F, T) float32 shares."""
    return stored.float() / pattern_scale(stored.shape[0])
