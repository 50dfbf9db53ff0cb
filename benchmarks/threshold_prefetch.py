"""What the software prefetch of short scattered rows buys ``threshold_linear`` (TEAL's kernel).

The kept input rows of a threshold linear lie apart in the (I, O) weight; each is a new stream
that the hardware prefetchers only find after its first misses. The C++ kernel prefetches rows
of up to 1,024 floats a block ahead. This builds the same source a second time with
``-DMOEFY_NO_SCATTER_PREFETCH`` (the kernel without it) and times both on cold weights: each
variant cycles through its own 64 MB of weight copies, and the order of the two alternates
between rounds (the second call after the first tends to find the memory system warmer).

Run: .venv/bin/python benchmarks/threshold_prefetch.py [--threads 1,2] [--rounds 3000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils import cpp_extension

from moefy.kernels import build
from moefy.kernels.backend import cpu_extension

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576), (2048, 5632), (5632, 2048))
KEEP = (1.0, 0.5, 0.25)
COPY_BYTES = 64e6


def _baseline_extension():
    """The kernel source built without the scattered-row prefetch (cached beside the real one)."""
    name = f"{build.library_name()}_noprefetch"
    folder = build.build_directory().parent / name
    folder.mkdir(parents=True, exist_ok=True)
    build._put_ninja_on_path()
    return cpp_extension.load(
        name=name,
        sources=[str(build.source_path())],
        extra_cflags=[*build.CFLAGS, "-DMOEFY_NO_SCATTER_PREFETCH"],
        extra_ldflags=list(build.LDFLAGS),
        build_directory=str(folder),
        verbose=False,
    )


def _time_pair(variants, shape, keep, rounds):
    """Median microseconds of each variant's threshold_linear at one shape and kept share."""
    in_features, out_features = shape
    copies = max(2, int(COPY_BYTES // (in_features * out_features * 4)))
    weights = {  # (I, O) each: every variant reads its own copies
        name: [torch.randn(in_features, out_features) for _ in range(copies)] for name in variants
    }
    x = torch.randn(1, in_features)
    cut = x.abs().quantile(1.0 - keep) if keep < 1.0 else torch.tensor(0.0)
    threshold = cut.reshape(1)
    times = {name: [] for name in variants}
    names = list(variants)
    for step in range(max(3, rounds // copies) * copies):
        copy = step % copies
        order = names if (step // copies) % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            variants[name].threshold_linear(x, weights[name][copy], None, threshold, None)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="torch thread counts, e.g. 1,2")
    parser.add_argument("--rounds", type=int, default=3000, help="timed calls per variant")
    args = parser.parse_args()
    variants = {"without": _baseline_extension(), "with": cpu_extension()}
    print("threshold_linear, batch 1, cold weights: median us without / with the prefetch")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for shape in SHAPES:
            for keep in KEEP:
                us = _time_pair(variants, shape, keep, args.rounds)
                print(
                    f"threads {threads}  {shape[0]:5d} -> {shape[1]:5d}  kept {keep:4.0%}: "
                    f"{us['without']:8.1f} / {us['with']:8.1f} us  "
                    f"({us['without'] / us['with']:.2f}x)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
