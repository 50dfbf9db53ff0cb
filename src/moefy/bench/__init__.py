"""Speed measurements: sparse kernels and sparse models against dense, in the same run.

The verb is :func:`run_bench` with a :class:`BenchConfig`; ``moefy bench`` and ``make bench``
call it. Speed lives here only, never in unit tests.
"""

from moefy.bench.decode import DecodeSpeed, decode_speeds, dense_copy, weight_bytes_per_token
from moefy.bench.run import BenchConfig, run_bench

__all__ = [
    "BenchConfig",
    "DecodeSpeed",
    "decode_speeds",
    "dense_copy",
    "run_bench",
    "weight_bytes_per_token",
]
