"""This machine's streaming read bandwidth, measured in the same run as the kernels it bounds."""

from __future__ import annotations

from pathlib import Path

import torch

from moefy.bench.timing import interleaved_medians

# Where Linux says how big the last-level cache is; used to size buffers well past it.
LLC_SIZE_FILE = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
LLC_FALLBACK_BYTES = 32 * 2**20
# Streaming buffers span this many last-level caches, so reads come from DRAM.
CACHE_MULTIPLE = 8
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}


def last_level_cache_bytes() -> int:
    """Size of the CPU's last-level cache (L3), or a 32 MiB guess where Linux does not say."""
    try:
        text = LLC_SIZE_FILE.read_text().strip()
    except OSError:
        return LLC_FALLBACK_BYTES
    unit = _UNITS.get(text[-1:].upper(), 1)
    digits = text[:-1] if text[-1:].upper() in _UNITS else text
    return int(digits) * unit if digits.isdigit() else LLC_FALLBACK_BYTES


def read_bandwidth(*, rounds: int) -> float:
    """Streaming read bandwidth in bytes per second with the current torch thread count.

    Sums a float32 buffer of ``CACHE_MULTIPLE`` last-level caches with the C++ kernels' loads
    and threads (plain ``torch.sum`` where they are not built, which reads slower): the same
    kind of access as the kernels' (long contiguous reads, little compute), so it bounds them.

    Example:
        >>> torch.set_num_threads(1); read_bandwidth(rounds=5) / 1e9
        22.4
    """
    from moefy.kernels.backend import cpu_extension

    n_floats = CACHE_MULTIPLE * last_level_cache_bytes() // 4
    buffer = torch.ones(n_floats, dtype=torch.float32)
    extension = cpu_extension()
    read = (lambda: extension.stream_sum(buffer)) if extension is not None else buffer.sum
    seconds = interleaved_medians({"read": read}, rounds=rounds)["read"]
    return buffer.numel() * buffer.element_size() / seconds
