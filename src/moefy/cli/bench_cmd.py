"""``moefy bench``: sparse kernels and sparse decoding against dense, timed in the same run."""

from __future__ import annotations

import argparse

from moefy.cli.args import DTYPE_CHOICES, add_output, claimed_output, device_spec, positive_int

HELP = "time the sparse FFN kernels and sparse decoding against dense (medians, ratios, limits)"
# moefy.bench.run.PARTS, spelled here so that --help imports no torch
BENCH_PARTS = ("ffn", "decode", "expert-size", "balance")


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
        "--only",
        choices=BENCH_PARTS,
        default=None,
        help="measure one table only (expert-size: what the expert size costs in the kernel; "
        "balance: experts a decode batch reads, with and without load balancing)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="time decoding with a static cache and a torch.compile'd step (dense and sparse "
        "alike; about a minute of compiling per variant) instead of generate",
    )
    parser.add_argument(
        "--model", default="smollm2-135m", help="model of the decode table (built-in or folder)"
    )
    parser.add_argument(
        "--methods",
        type=lambda text: tuple(m.strip() for m in text.split(",") if m.strip()),
        default=(),
        help="comma-separated training-free methods timed in the decode table beside TEAL at "
        "50 %% sparsity, e.g. rotate,scap (METHOD:FIELD=VALUE sets a config field)",
    )
    parser.add_argument(
        "--device",
        type=device_spec,
        default="cpu",
        metavar="{cpu,cuda}",
        help="cpu (default): the C++ kernels and SmolLM2 decode; cuda: the Triton kernels "
        "against cuBLAS on Llama-3 shapes, then decode of a random Llama-3-8B-shaped model",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="with --device cuda: weight dtype (auto = bf16)",
    )
    parser.add_argument(
        "--shape",
        choices=("llama3-8b", "smollm2-135m"),
        default="llama3-8b",
        help="with --device cuda: the random-weight model of the decode table",
    )
    parser.add_argument(
        "--layers", type=positive_int, default=None, help="with --device cuda: decoder layers"
    )
    add_output(parser, "write the results to this JSON file", default=None)


def run(args: argparse.Namespace) -> int:
    with claimed_output(args, "file"):  # checked before any work, locked while it runs
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from moefy.bench import BenchConfig, run_bench
    from moefy.bench.report import cpu_report
    from moefy.cli.show import console, esc, print_report, status
    from moefy.device import dtype_name, resolve
    from moefy.errors import MoefyError
    from moefy.io import write_json

    device, dtype = resolve(args.device, args.dtype)
    if device.type == "cuda":
        if args.only in ("expert-size", "balance"):
            raise MoefyError(f"--only {args.only} runs on the CPU: leave out --device cuda")
        return _run_gpu(args, device, dtype_name(dtype))
    config = BenchConfig(
        threads=args.threads,
        quick=args.quick,
        rounds=args.rounds,
        new_tokens=args.new_tokens,
        parts=(args.only,) if args.only else BENCH_PARTS,
        model=args.model,
        methods=args.methods,
        compile=args.compile,
    )
    with status("benchmarking") as progress:
        results = run_bench(config, progress=progress.update)
    print_report(cpu_report(results))
    if args.out:
        write_json(args.out, results, overwrite=args.overwrite)
        console().print(f"results written to [bold]{esc(args.out)}[/bold]")
    return 0


def _run_gpu(args: argparse.Namespace, device, dtype: str) -> int:
    """``--device cuda``: the Triton kernels against cuBLAS (:func:`moefy.bench.run_gpu_bench`),
    then decode of a random-weight model of real shapes, dense against TEAL and the MoE FFN
    under CUDA graphs (:func:`moefy.bench.gpu_decode.run_decode_bench`)."""
    from moefy.bench import GpuBenchConfig, gpu_report, run_gpu_bench
    from moefy.bench.gpu_decode import DecodeBenchConfig, decode_report, run_decode_bench
    from moefy.cli.show import console, esc, print_report, status
    from moefy.io import write_json

    results = {}
    if args.only != "decode":
        config = GpuBenchConfig(dtype=dtype, rounds=args.rounds, quick=args.quick)
        with status("benchmarking the kernels on the GPU") as progress:
            results = run_gpu_bench(config, device=device, progress=progress.update)
        print_report(gpu_report(results))
    if args.only != "ffn":
        decode_config = DecodeBenchConfig(
            shape=args.shape,
            layers=args.layers,
            dtype=dtype,
            new_tokens=args.new_tokens,
            quick=args.quick,
            compile=True,
        )
        with status("decoding on the GPU") as progress:
            decode = run_decode_bench(decode_config, device=device, progress=progress.update)
        print_report(decode_report(decode))
        results["end_to_end"] = decode
    if args.out:
        write_json(args.out, results, overwrite=args.overwrite)
        console().print(f"results written to [bold]{esc(args.out)}[/bold]")
    return 0
