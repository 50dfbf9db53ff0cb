"""Speed measurements: sparse kernels and sparse models against dense, in the same run.

The verb is :func:`run_bench` with a :class:`BenchConfig`; ``moefy bench`` and ``make bench``
call it. On a GPU, :func:`run_gpu_bench` with a :class:`GpuBenchConfig` times the Triton kernels
(:mod:`moefy.bench.gpu`). Speed lives here only, never in unit tests.
"""

from moefy.bench.decode import DecodeSpeed, decode_speeds, dense_copy, weight_bytes_per_token
from moefy.bench.gpu import GpuBenchConfig, gpu_report, run_gpu_bench
from moefy.bench.report import Table, cpu_report
from moefy.bench.run import BenchConfig, run_bench

__all__ = [
    "BenchConfig",
    "DecodeSpeed",
    "GpuBenchConfig",
    "Table",
    "cpu_report",
    "decode_speeds",
    "dense_copy",
    "gpu_report",
    "run_bench",
    "run_gpu_bench",
    "weight_bytes_per_token",
]
