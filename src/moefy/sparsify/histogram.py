"""Fixed-size log-spaced histograms of non-negative scores, and quantiles read from them.

Calibration needs the value below which a given share of a layer's scores (``|x|``,
``|x| * ||W[:, i]||``, ...) falls, over millions of entries. Keeping the entries is unbounded;
a histogram over ``log2(score)`` with a fixed range and resolution is a few kilobytes per layer,
adds up exactly over batches and ranks (its counts are integers held in float64), and gives
quantiles to a relative error of ``2 ** (1 / BINS_PER_OCTAVE) - 1`` (about 1 %) before the
linear interpolation inside the bin.

Shape legend:
    H: number of bins (``NUM_BINS``)
"""

from __future__ import annotations

import torch

LOG2_LOW = -32  # scores below 2**-32 (and exact zeros) fall in the underflow bin
LOG2_HIGH = 16  # scores at or above 2**16 fall in the overflow bin
BINS_PER_OCTAVE = 64
NUM_BINS = (LOG2_HIGH - LOG2_LOW) * BINS_PER_OCTAVE + 2  # + underflow + overflow


def empty_histogram(device: torch.device | str | None = None) -> torch.Tensor:
    """(H,) float64 zeros."""
    return torch.zeros(NUM_BINS, dtype=torch.float64, device=device)


def add_to_histogram_(counts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Count ``scores`` (any shape, >= 0) into ``counts`` (H,) in place and return it.

    Example:
        >>> counts = add_to_histogram_(empty_histogram(), torch.rand(1000))
        >>> int(counts.sum())
        1000
    """
    flat = scores.detach().reshape(-1).float()
    # log2(0) = -inf -> clamps into the underflow bin 0.
    position = (torch.log2(flat) - LOG2_LOW) * BINS_PER_OCTAVE
    index = position.floor().nan_to_num(nan=-1.0, neginf=-1.0, posinf=float(NUM_BINS))
    index = (index + 1).clamp_(0, NUM_BINS - 1).long()
    counts += torch.bincount(index, minlength=NUM_BINS).to(counts)
    return counts


def histogram_quantile(counts: torch.Tensor, share: float) -> float:
    """The score ``t`` such that about ``share`` of the counted scores are ``<= t``.

    ``share == 0`` gives 0 (only exact zeros fall below). When the share is reached inside the
    underflow bin the answer is 0 as well, so a layer whose activations are exactly zero more
    often than ``share`` (ReLU) keeps every non-zero entry.

    Args:
        counts: (H,) histogram from :func:`add_to_histogram_`.
        share: in [0, 1].

    Returns:
        The threshold, interpolated linearly in log space inside its bin.

    Example:
        >>> counts = add_to_histogram_(empty_histogram(), torch.rand(100_000))
        >>> round(histogram_quantile(counts, 0.5), 2)
        0.5
    """
    total = float(counts.sum())
    if share <= 0.0 or total == 0.0:
        return 0.0
    target = min(share, 1.0) * total
    cumulative = torch.cumsum(counts, dim=0)  # (H,)
    bin_index = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=counts.dtype)))
    bin_index = min(bin_index, NUM_BINS - 1)
    if bin_index == 0:
        return 0.0
    if bin_index == NUM_BINS - 1:
        return float(2.0**LOG2_HIGH)
    below = float(cumulative[bin_index - 1])
    inside = float(counts[bin_index])
    fraction = (target - below) / inside if inside > 0 else 1.0
    log2_value = LOG2_LOW + (bin_index - 1 + fraction) / BINS_PER_OCTAVE
    return float(2.0**log2_value)


def histogram_share_at_or_below(counts: torch.Tensor, threshold: float) -> float:
    """The share of counted scores ``<= threshold`` (the inverse of :func:`histogram_quantile`)."""
    total = float(counts.sum())
    if total == 0.0:
        return 0.0
    if threshold <= 0.0:
        return float(counts[0]) / total
    position = (
        torch.log2(torch.tensor(threshold, dtype=torch.float64)) - LOG2_LOW
    ) * BINS_PER_OCTAVE
    position = float(position.clamp(0.0, NUM_BINS - 2.0))
    whole = int(position // 1)
    fraction = position - whole
    below = float(counts[: whole + 1].sum())
    partial = float(counts[whole + 1]) * fraction if whole + 1 < NUM_BINS else 0.0
    return (below + partial) / total
