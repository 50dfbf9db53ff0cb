"""``moefy bench``: sparse kernels and sparse decoding against dense, timed in the same run."""

from __future__ import annotations

import argparse

from moefy.cli.args import DTYPE_CHOICES, device_spec, positive_int

HELP = "time the sparse FFN kernels and sparse decoding against dense (medians, ratios, limits)"


def _thread_list(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated thread counts, e.g. ``1,2``."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,2, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=_thread_list,
        default=(),
        help="torch thread counts to run at, e.g. 1,2 (default: 1 and every core)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds and shorter decodes (noisier)"
    )
    parser.add_argument("--rounds", type=positive_int, default=None, help="timed calls per FFN")
    parser.add_argument(
        "--new-tokens", type=positive_int, default=None, help="tokens per timed generate"
    )
    parser.add_argument(
        "--only", choices=("ffn", "decode"), default=None, help="measure one table only"
    )
    parser.add_argument(
        "--model", default="smollm2-135m", help="model of the decode table (built-in or folder)"
    )
    parser.add_argument(
        "--device",
        type=device_spec,
        default="cpu",
        metavar="{cpu,cuda}",
        help="cpu (default): the C++ kernels and SmolLM2 decode; cuda: the Triton kernels "
        "against cuBLAS on Llama-3 shapes (kernel level)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="with --device cuda: weight dtype (auto = bf16)",
    )
    parser.add_argument("--out", default=None, help="write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    from moefy.bench import BenchConfig, run_bench
    from moefy.bench.report import print_results
    from moefy.cli.show import console
    from moefy.device import dtype_name, resolve
    from moefy.io import write_json

    device, dtype = resolve(args.device, args.dtype)
    if device.type == "cuda":
        return _run_gpu(args, device, dtype_name(dtype))
    config = BenchConfig(
        threads=args.threads,
        quick=args.quick,
        rounds=args.rounds,
        new_tokens=args.new_tokens,
        parts=(args.only,) if args.only else ("ffn", "decode"),
        model=args.model,
    )
    with console().status("benchmarking") as status:
        results = run_bench(config, progress=lambda message: status.update(message))
    print_results(results)
    if args.out:
        write_json(args.out, results)
        console().print(f"results written to [bold]{args.out}[/bold]")
    return 0


def _run_gpu(args: argparse.Namespace, device, dtype: str) -> int:
    """``--device cuda``: the Triton kernels against cuBLAS (:func:`moefy.bench.run_gpu_bench`)."""
    from moefy.bench import GpuBenchConfig, print_gpu_results, run_gpu_bench
    from moefy.cli.show import console
    from moefy.errors import MoefyError
    from moefy.io import write_json

    if args.only == "decode":
        raise MoefyError(
            "the GPU bench measures kernels only so far: drop --only decode (end-to-end GPU "
            "decode timing is not built yet)"
        )
    config = GpuBenchConfig(dtype=dtype, rounds=args.rounds, quick=args.quick)
    with console().status("benchmarking on the GPU") as status:
        results = run_gpu_bench(config, device=device, progress=status.update)
    print_gpu_results(results)
    if args.out:
        write_json(args.out, results)
        console().print(f"results written to [bold]{args.out}[/bold]")
    return 0
