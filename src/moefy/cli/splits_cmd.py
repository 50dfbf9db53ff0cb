"""``moefy splits``: compare MoEfication split methods by perplexity at several expert shares."""

from __future__ import annotations

import argparse

from moefy.cli.args import (
    RESULTS_HELP,
    add_device_and_dtype,
    add_keep_option,
    add_model_and_data,
    device_and_dtype,
    float_list,
    keep_option,
    positive_int,
)

HELP = "perplexity of each split method at several shares of experts (oracle selection)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_data(parser, tokens=8192)
    add_device_and_dtype(parser)
    parser.add_argument("--experts", type=positive_int, default=64, help="experts per FFN layer")
    parser.add_argument(
        "--methods",
        default="random,params,coactivation",
        help="comma-separated split methods",
    )
    add_keep_option(
        parser,
        former="--fractions",
        type=float_list,
        default=(0.5, 0.25, 0.125),
        help="comma-separated shares of experts kept per token",
    )
    parser.add_argument(
        "--profile",
        default=None,
        help="profile folder (moefy profile): co-activation counts for coactivation, activation "
        "patterns for activation",
    )
    parser.add_argument("--results", default="runs/results.json", help=RESULTS_HELP)


def run(args: argparse.Namespace) -> int:
    from moefy.results import check_results_file

    check_results_file(args.results)  # rows are added at the end, under a lock of their own
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from moefy.arch import find_ffns
    from moefy.cli.show import console, esc, print_table, status
    from moefy.data.text import load_text
    from moefy.errors import MoefyError
    from moefy.models.load import load_model
    from moefy.moe import moe_layers
    from moefy.moe.quality import split_quality
    from moefy.moe.split import SPLIT_METHODS
    from moefy.profiling import SparsityProfile
    from moefy.results import add_rows

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = ", ".join(sorted(SPLIT_METHODS))
    unknown = [m for m in methods if m not in SPLIT_METHODS]
    if unknown:
        raise MoefyError(f"--methods: unknown split method {', '.join(unknown)} (known: {known})")
    if not methods:
        raise MoefyError(f"--methods names no split method (known: {known})")
    needs_profile = [
        m
        for m in methods
        if SPLIT_METHODS.get(m).value.needs_coactivation
        or SPLIT_METHODS.get(m).value.needs_patterns
    ]
    if needs_profile and not args.profile:
        raise MoefyError(
            f"--methods {', '.join(needs_profile)} need --profile (a folder from moefy profile; "
            "coactivation needs moefy profile --coactivation)"
        )
    if any(not 0.0 < share <= 1.0 for share in args.keep) or not args.keep:
        raise MoefyError(f"{keep_option(args)} must lie in (0, 1], got {args.keep}")
    device, dtype = device_and_dtype(args)
    profile = SparsityProfile.load(args.profile) if args.profile else None
    text = load_text(args.data)  # a bad --data fails before the model loads
    with status(f"loading {args.model}"):
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
        if moe_layers(model):  # before the dense evaluation, not after it
            raise MoefyError(
                f"{args.model} is a moefied model already: compare split methods on the dense "
                "model it was converted from (e.g. --model smollm2-135m)"
            )
        find_ffns(model)  # a one-line error for dropped MLPs, before the dense evaluation
        blocks = text.blocks(
            tokenizer, split="evaluation", block_len=args.block_len, n_tokens=args.tokens
        )
    rows = split_quality(
        model,
        blocks,
        methods,
        args.keep,
        num_experts=args.experts,
        profile=profile,
        batch_size=args.batch_size,
        progress=True,
    )
    for row in rows:
        row.update(model=args.model, data=args.data, eval_tokens=blocks.n_tokens)
    add_rows(args.results, rows)
    shown = [
        {
            "method": r["method"],
            "keep %": 100 * r["level"],
            "measured active %": 100 * r["active_fraction"],
            "FFN FLOPs %": 100 * r["ffn_flops_ratio"],
            "perplexity": r["perplexity"],
            "x dense": r["ppl_ratio"],
        }
        for r in rows
    ]
    print_table(
        f"MoEfication, oracle selection: {args.model}, {args.experts} experts/layer, "
        f"{blocks.n_tokens} evaluation tokens of {args.data}",
        shown,
    )
    console().print(f"rows added to [bold]{esc(args.results)}[/bold]")
    return 0
