"""Fixed-size histograms of non-negative scores, octave by octave, and quantiles read from them.

Calibration needs the value below which a given share of a layer's scores (``|x|``,
``|x| * ||W[:, i]||``, ...) falls, over millions of entries. Keeping the entries is unbounded;
a histogram with a fixed range and resolution is a few kilobytes per layer, adds up exactly over
batches and ranks (its counts are integers held in float64), and gives quantiles to a relative
error of at most ``2 ** -MANTISSA_BITS`` (0.8 %) before the linear interpolation inside the bin.

The bins are those of the float32 bit pattern: every octave ``[2**e, 2**(e + 1))`` is cut into
``BINS_PER_OCTAVE`` equal parts, and a score's bin is its exponent and top ``MANTISSA_BITS``
mantissa bits, read with one shift of its bits (no logarithm): calibration streams billions of
scores through :func:`add_to_histogram_`, and a shift, a subtraction, a clamp and a count are
the whole cost.

Shape legend:
    H: number of bins (``NUM_BINS``)
"""

from __future__ import annotations

import math

import torch

LOG2_LOW = -32  # scores below 2**-32 (and exact zeros) fall in the underflow bin
LOG2_HIGH = 16  # scores at or above 2**16 (and NaN) fall in the overflow bin
MANTISSA_BITS = 7
BINS_PER_OCTAVE = 2**MANTISSA_BITS
NUM_BINS = (LOG2_HIGH - LOG2_LOW) * BINS_PER_OCTAVE + 2  # + underflow + overflow

# a float32's bits shifted right by _SHIFT: its biased exponent and top mantissa bits
_SHIFT = 23 - MANTISSA_BITS
_FLOAT32_BIAS = 127
# the shifted bits of 2**LOG2_LOW, which land in bin 1
_LOW_KEY = (LOG2_LOW + _FLOAT32_BIAS) << MANTISSA_BITS


def empty_histogram(device: torch.device | str | None = None) -> torch.Tensor:
    """(H,) float64 zeros."""
    return torch.zeros(NUM_BINS, dtype=torch.float64, device=device)


def bin_indices(scores: torch.Tensor) -> torch.Tensor:
    """The (N,) int32 bin of each score (any shape, >= 0), flattened."""
    flat = scores.detach().reshape(-1).float()
    # non-negative float32s order as their bit patterns do; 0 -> bin 0, inf and NaN -> the last
    key = flat.view(torch.int32) >> _SHIFT
    return key.sub_(_LOW_KEY - 1).clamp_(0, NUM_BINS - 1)


def add_to_histogram_(counts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Count ``scores`` (any shape, >= 0) into ``counts`` (H,) in place and return it.

    Example:
        >>> counts = add_to_histogram_(empty_histogram(), torch.rand(1000))
        >>> int(counts.sum())
        1000
    """
    counts += torch.bincount(bin_indices(scores), minlength=NUM_BINS).to(counts)
    return counts


def _bin_edges(bin_index: int) -> tuple[float, float]:
    """Lower and upper score of an in-range bin (1 .. H - 2)."""
    octave, part = divmod(bin_index - 1, BINS_PER_OCTAVE)
    base = math.ldexp(1.0, LOG2_LOW + octave)
    return base * (1 + part / BINS_PER_OCTAVE), base * (1 + (part + 1) / BINS_PER_OCTAVE)


def histogram_quantile(counts: torch.Tensor, share: float) -> float:
    """The score ``t`` such that about ``share`` of the counted scores are ``<= t``.

    ``share == 0`` gives 0 (only exact zeros fall below). When the share is reached inside the
    underflow bin the answer is 0 as well, so a layer whose activations are exactly zero more
    often than ``share`` (ReLU) keeps every non-zero entry.

    Args:
        counts: (H,) histogram from :func:`add_to_histogram_`.
        share: in [0, 1].

    Returns:
        The threshold, interpolated linearly inside its bin.

    Example:
        >>> counts = add_to_histogram_(empty_histogram(), torch.rand(100_000))
        >>> round(histogram_quantile(counts, 0.5), 2)
        0.5
    """
    counts = counts.detach().cpu()  # a few thousand bins: read them where the scalars live
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
    low, high = _bin_edges(bin_index)
    return low + (high - low) * fraction


def histogram_share_at_or_below(counts: torch.Tensor, threshold: float) -> float:
    """The share of counted scores ``<= threshold`` (the inverse of :func:`histogram_quantile`)."""
    total = float(counts.sum())
    if total == 0.0:
        return 0.0
    if threshold < 2.0**LOG2_LOW:
        return float(counts[0]) / total
    if threshold >= 2.0**LOG2_HIGH:
        return float(counts[:-1].sum()) / total
    mantissa, exponent = math.frexp(threshold)  # threshold = mantissa * 2**exponent, [0.5, 1)
    position = (2.0 * mantissa - 1.0) * BINS_PER_OCTAVE  # [0, BINS_PER_OCTAVE)
    part = min(int(position), BINS_PER_OCTAVE - 1)
    bin_index = 1 + (exponent - 1 - LOG2_LOW) * BINS_PER_OCTAVE + part
    below = float(counts[:bin_index].sum())
    return (below + float(counts[bin_index]) * (position - part)) / total
