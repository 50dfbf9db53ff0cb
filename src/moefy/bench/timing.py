"""Interleaved timing: every variant runs once per round, so drift hits all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch


def interleaved_medians(
    variants: Mapping[str, Callable[[], object]], *, rounds: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each variant, timed round-robin.

    Calls that run CUDA work are timed to its end (the device is synchronised around each).

    Args:
        variants: name -> a call to time (its result is discarded).
        rounds: timed calls per variant.
        warmup: untimed rounds first (builds, caches, page faults).

    Returns:
        name -> median seconds.

    Example:
        >>> interleaved_medians({"dense": dense_call, "sparse": sparse_call}, rounds=9)
    """
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    # GPU work is asynchronous: wait for it on both sides of each timed call
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    with torch.inference_mode():
        for round_index in range(warmup + rounds):
            for name, call in variants.items():
                sync()
                start = time.perf_counter()
                call()
                sync()
                elapsed = time.perf_counter() - start
                if round_index >= warmup:
                    seconds[name].append(elapsed)
    return {name: statistics.median(values) for name, values in seconds.items()}
