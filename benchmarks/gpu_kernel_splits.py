"""Tune the Triton threshold kernel on a GPU: split count and pipelining depth against cuBLAS.

The first H200 run (docs/bench.md, 2026-12-04) timed the threshold kernel at 55 to 60 us on the
Llama-3-8B up projection at batch 1 whatever its sparsity (cuBLAS dense: 30.7 us). The working
guess: with the default grid (4 programs per SM) each program walks about 26 steps of 32 input
rows, and every step waits for its inputs and then for the weight rows they keep, so time is
steps x memory latency and a dropped row saves bytes but no time. If so, more splits (fewer
steps per program) should cut the dense-equivalent time towards cuBLAS and let sparsity show.
This script measures that guess in one call: every split count and pipelining depth below, on
the Llama-3-8B up and down shapes at batch 1, sparsity 0 / 50 / 90 %, each variant in its own
CUDA graph with the weights rotated past L2, cuBLAS dense timed in the same rounds.

    python benchmarks/gpu_kernel_splits.py --out runs/splits.json      # needs CUDA and triton

Shape legend: N tokens (batch), I input features, O output features.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch

from moefy.bench import gpu
from moefy.io import write_json

SPLITS = (None, 8, 16, 32, 64, 128)  # None: the kernel's own choice
STAGES = (None, 2, 4)  # None: Triton's default pipelining depth
SHAPES = ("llama3-8b up 4096->14336", "llama3-8b down 14336->4096")
SPARSITIES = (0.0, 0.5, 0.9)


def _variant_name(splits: int | None, stages: int | None, sparsity: float) -> str:
    return f"splits={splits or 'auto'} stages={stages or 'auto'}@{sparsity}"


def _threshold(x, weights_t, thr, splits, stages, i):
    from moefy.kernels import triton_threshold

    return triton_threshold.threshold_project(
        x, [weights_t[i]], [None], thr, splits=splits, num_stages=stages
    )[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON of every row (default: print only)")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_kernel_splits.py: needs a CUDA GPU (and triton)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    config = gpu.GpuBenchConfig(batches=(1,), sparsities=SPARSITIES, rounds=args.rounds)
    bandwidth = gpu.copy_bandwidth(device, rounds=5)
    l2_bytes = gpu.gpu_machine(device)["l2_bytes"]
    random = gpu._RandomWeights(config, device)
    rows = []
    for shape in (s for s in gpu.LINEAR_SHAPES if s.name in SHAPES):
        copies = gpu.copies_for(shape.weight_bytes(random.element_bytes), l2_bytes)
        weights = [random(shape.n_out, shape.n_in) for _ in range(copies)]  # (O, I) each
        weights_t = [w.t().contiguous() for w in weights]  # (I, O) each
        x = random.tokens(1, shape.n_in)  # (N, I)
        dense = functools.partial(gpu._dense_linear, x, weights)
        variants = {"dense": gpu._rotating_graph(dense, copies, config.calls_per_graph)}
        moved = {}
        for sparsity in SPARSITIES:
            thr = gpu.sparsity_threshold(x, sparsity)
            for splits in SPLITS:
                for stages in STAGES:
                    name = _variant_name(splits, stages, sparsity)
                    call = functools.partial(_threshold, x, weights_t, thr, splits, stages)
                    variants[name] = gpu._rotating_graph(call, copies, config.calls_per_graph)
                    moved[name] = gpu.linear_bytes(
                        shape, 1, gpu.kept_rows(x, thr), random.element_bytes
                    )
        dense_bytes = gpu.linear_bytes(shape, 1, shape.n_in, random.element_bytes)
        for row in gpu._rows(config, shape.name, 1, variants, moved, dense_bytes, bandwidth):
            rows.append(row)
        print(f"{shape.name}: cuBLAS dense {rows[-1]['dense_ms'] * 1e3:.1f} us")
        for row in rows[-len(moved) :]:
            print(
                f"  {row['method']:28s} {1 - row['active']:4.0%}  {row['sparse_ms'] * 1e3:7.1f} us"
                f"  {row['speedup']:5.2f}x (limit {row['limit_speedup']:5.2f}x)"
            )
    if args.out:
        write_json(args.out, {"bandwidth_gbps": bandwidth / 1e9, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
