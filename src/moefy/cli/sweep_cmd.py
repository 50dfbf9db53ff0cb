"""``moefy sweep``: every method at several levels on one evaluation, cached, with report.html."""

from __future__ import annotations

import argparse

from moefy.cli.args import (
    add_device_and_dtype,
    add_model_and_data,
    add_output,
    claimed_output,
    float_list,
    positive_int,
)

HELP = "evaluate many methods at several levels on the same text; write report.html"


def _method_levels(text: str) -> tuple[str, tuple[float, ...]]:
    """argparse type: ``METHOD=L1,L2`` (the last ``=``: a method variant has its own,
    ``teal:attention=true=0.5``)."""
    name, sep, levels = text.rpartition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected METHOD=LEVEL,LEVEL, got {text!r}")
    return name.strip(), float_list(levels)


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that build an EvalConfig (shared with ``moefy evaluate``)."""
    parser.add_argument(
        "--tasks",
        default=None,
        help="comma-separated: perplexity, agreement, bbc-topic, tweet-sentiment "
        "(default: perplexity,agreement; evaluate: perplexity)",
    )
    parser.add_argument(
        "--agreement-tokens",
        type=positive_int,
        default=2048,
        help="tokens compared with the dense model for top-1 agreement and KL",
    )
    parser.add_argument(
        "--classify-examples",
        type=positive_int,
        default=100,
        help="documents scored per classification task",
    )


def eval_config(args: argparse.Namespace, default_tasks: tuple[str, ...]):
    """The EvalConfig the arguments describe."""
    from moefy.eval.config import EvalConfig

    tasks = (
        tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        if args.tasks
        else default_tasks
    )
    return EvalConfig(
        data=args.data,
        tasks=tasks,
        tokens=args.tokens,
        agreement_tokens=args.agreement_tokens,
        block_len=args.block_len,
        batch_size=args.batch_size,
        classify_examples=args.classify_examples,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_data(parser, tokens=8192)
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods: dense, the moe-* methods (oracle, routers, dynk), every "
        "method of moefy sparsify --method, and the layer methods; an unknown name lists them "
        "all (default: dense, moe-oracle and every moefy sparsify method); a sparsify method "
        "with config fields set is METHOD:FIELD=VALUE, e.g. teal:attention=true",
    )
    parser.add_argument(
        "--levels",
        type=float_list,
        default=(),
        help="keep (share of the FFN kept) for every FFN method, e.g. 0.5,0.25: the share of "
        "experts, or 1 - sparsity for thresholds; default: each method's own levels",
    )
    parser.add_argument(
        "--level",
        type=_method_levels,
        action="append",
        default=[],
        metavar="METHOD=LEVELS",
        help="levels for one method, e.g. moe-dynk=0.9,0.8 or drop-attn=2,4 (repeatable)",
    )
    add_evaluation_arguments(parser)
    parser.add_argument(
        "--calibration-tokens",
        type=positive_int,
        default=8192,
        help="calibration tokens for the methods that calibrate (thresholds, layer methods, "
        "the carve and its expert budgets)",
    )
    parser.add_argument("--moe", default=None, help="moefied model folder (moefy convert)")
    parser.add_argument(
        "--routed", default=None, help="moefied model with trained routers (moefy train-routers)"
    )
    parser.add_argument(
        "--carved",
        default=None,
        help="carved model for moe-carved (moefy convert --shared ... --router analytic); "
        "default: carve the model on the calibration text",
    )
    parser.add_argument("--profile", default=None, help="profile folder: its plots join the report")
    parser.add_argument(
        "--experts", type=positive_int, default=64, help="experts per layer when --moe is not given"
    )
    add_output(parser, "sweep folder (cache, rows, report)", default="runs/sweep", resume=True)
    add_device_and_dtype(parser)


def run(args: argparse.Namespace) -> int:
    with claimed_output(args, "folder", resume=True):  # checked before any work, locked
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from moefy import dist
    from moefy.cli.show import console, esc, print_table
    from moefy.errors import MoefyError
    from moefy.sweep import SweepConfig, headline, sweep
    from moefy.sweep.methods import default_method_names

    given = args.methods if args.methods is not None else ",".join(default_method_names())
    methods = tuple(m.strip() for m in given.split(",") if m.strip())
    named = [name for name, _ in args.level]
    twice = sorted({name for name in named if named.count(name) > 1})
    if twice:
        raise MoefyError(
            f"--level given twice for {', '.join(twice)}: put all of a method's levels in one "
            f"--level {twice[0]}=LEVEL,LEVEL"
        )
    config = SweepConfig(
        model=args.model,
        methods=methods,
        levels=args.levels,
        method_levels=dict(args.level),
        eval=eval_config(args, ("perplexity", "agreement")),
        calibration_tokens=args.calibration_tokens,
        moe=args.moe,
        routed=args.routed,
        carved=args.carved,
        profile=args.profile,
        experts=args.experts,
        device=args.device,
        dtype=args.dtype,
    )
    dist.init_from_env(config.resolved()[0])
    main = dist.is_main_process()
    if main:
        console().print(f"sweep: {len(config.plan())} evaluations into {esc(args.out)}")
    on_row = _print_row if main else None
    result = sweep(config, args.out, progress=main, overwrite=args.overwrite, on_row=on_row)
    if not main:
        return 0
    print_table(
        f"{args.model} on {args.data}: {config.eval.tokens} evaluation tokens "
        f"({result.computed} evaluated now, the rest from the cache)",
        [_table_row(row) for row in result.rows],
    )
    for entry in headline(result.rows):
        row = entry["row"]
        if row is None:
            console().print(f"within {entry['budget']:.0%} of dense FFN FLOPs: no method fits")
        else:
            console().print(
                f"best within {entry['budget']:.0%} of dense FFN FLOPs: [bold]{esc(row['method'])}"
                f"[/bold] {row['level']:g} (perplexity {row['perplexity']:.2f}, FFN FLOPs "
                f"{row['ffn_flops_fraction']:.1%})"
            )
    console().print(f"report: [bold]{esc(result.report)}[/bold]")
    return 0


def _print_row(row: dict) -> None:
    """One line per (method, level) as soon as the sweep has evaluated it."""
    from moefy.cli.show import console

    level = "" if row["level"] is None else f" {row['level']:g}"
    flops = row.get("ffn_flops_fraction")
    ppl = row.get("perplexity")
    console().print(
        f"  {row['method']}{level}: FFN FLOPs "
        f"{'n/a' if flops is None else f'{flops:.1%}'}, perplexity "
        f"{'n/a' if ppl is None else f'{ppl:.2f}'} ({row['seconds']:.0f} s)"
    )


def _table_row(row: dict) -> dict:
    def pct(value):
        return None if value is None else f"{value:.1%}"

    out = {
        "method": row["method"],
        "level": "" if row["level"] is None else f"{row['level']:g}",
        "FFN FLOPs": pct(row.get("ffn_flops_fraction")),
        "linear FLOPs": pct(row.get("linear_flops_fraction")),
        "skipped": pct(row.get("measured_sparsity")),
        "perplexity": None if row.get("perplexity") is None else f"{row['perplexity']:.2f}",
        "x dense": None
        if row.get("perplexity_ratio") is None
        else f"{row['perplexity_ratio']:.3f}",
        "top-1 agr.": pct(row.get("top1_agreement")),
        "KL": None if row.get("kl_to_dense") is None else f"{row['kl_to_dense']:.3f}",
    }
    for key, value in row.items():
        if key.endswith("_accuracy") and value is not None:
            out[key.removesuffix("_accuracy")] = pct(value)
    return out
