"""``moefy drop``: drop the most redundant layers (or skip middle blocks), measure, save."""

from __future__ import annotations

import argparse
import math

from moefy.cli.args import (
    add_device_and_dtype,
    add_eval_tokens,
    add_model_and_data,
    add_output,
    device_and_dtype,
    float_type,
    non_negative_int,
    run_claimed,
)

HELP = "drop the most redundant attention/MLP layers or blocks, or skip middle blocks; save"

REPORT_FILE = "drop_report.json"


# argparse type: a finite number >= 1
_speedup = float_type(
    "a finite number >= 1", lambda value: math.isfinite(value) and value >= 1.0, finite=False
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_data(parser, tokens=8192)
    add_device_and_dtype(parser)
    parser.add_argument(
        "--attention",
        type=non_negative_int,
        default=0,
        help="most redundant attention layers to drop",
    )
    parser.add_argument(
        "--mlp", type=non_negative_int, default=0, help="most redundant MLPs to drop"
    )
    parser.add_argument(
        "--blocks", type=non_negative_int, default=0, help="most redundant blocks to drop"
    )
    skip = parser.add_mutually_exclusive_group()
    skip.add_argument(
        "--skip",
        type=non_negative_int,
        default=0,
        help="Unified Layer Skipping: blocks to skip, spread evenly through the middle",
    )
    skip.add_argument(
        "--speedup",
        type=_speedup,
        default=None,
        help="Unified Layer Skipping: skip as many middle blocks as this target speedup asks",
    )
    parser.add_argument(
        "--free-weights",
        action="store_true",
        help="do not keep the dropped weights (smaller folder; restore_layers is then impossible)",
    )
    add_eval_tokens(
        parser, "tokens of evaluation text for the perplexity before and after", default=4096
    )
    add_output(parser, "output folder for the dropped model", default="runs/drop")


def run(args: argparse.Namespace) -> int:
    return run_claimed(args, _run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moefy.cli.show import console, esc, status
    from moefy.data.text import load_text
    from moefy.errors import MoefyError
    from moefy.eval.perplexity import perplexity
    from moefy.layers import check_drop, drop_layers_, find_layers, save_dropped
    from moefy.models.load import is_causal_lm, load_model

    if not (args.attention or args.mlp or args.blocks or args.skip or args.speedup):
        raise MoefyError("nothing to drop: give --attention, --mlp, --blocks, --skip or --speedup")
    device, dtype = device_and_dtype(args)
    with status(f"loading {args.model}"):
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
        num_blocks = len(find_layers(model))
        text = load_text(args.data)
        evaluation = text.blocks(
            tokenizer, split="evaluation", block_len=args.block_len, n_tokens=args.eval_tokens
        )
    plan = _plan(args, model, text, tokenizer, num_blocks)
    check_drop(model, plan)  # before the perplexity runs
    causal = is_causal_lm(model)
    dense = perplexity(model, evaluation, args.batch_size, progress=True) if causal else None
    dropped = drop_layers_(model, **plan.indices(), keep_weights=not args.free_weights)
    after = perplexity(model, evaluation, args.batch_size, progress=True) if causal else None
    summary = _summary(args, num_blocks, dropped, dense, after, evaluation.n_tokens)
    out = Path(args.out)
    save_dropped(
        model,
        out,
        tokenizer=tokenizer,
        extra_json={REPORT_FILE: summary},
        overwrite=args.overwrite,
    )
    console().print(f"model written to [bold]{esc(out)}[/bold] (load with moefy.load_model)")
    return 0


def _plan(args: argparse.Namespace, model, text, tokenizer, num_blocks: int):
    """The :class:`moefy.layers.DropConfig` the options ask for: the middle blocks to skip and
    the most redundant parts (measured on the calibration text), together."""
    from moefy.errors import MoefyError
    from moefy.layers import (
        DropConfig,
        blocks_for_speedup,
        layer_importance,
        plan_most_redundant,
        plan_uniform_skip,
    )
    from moefy.layers.config import LayerImportanceConfig

    for flag, n in (
        ("--attention", args.attention),
        ("--mlp", args.mlp),
        ("--blocks", args.blocks),
    ):
        if n > num_blocks:
            raise MoefyError(f"{flag} {n}: the model has only {num_blocks} blocks")
    skip = blocks_for_speedup(num_blocks, args.speedup) if args.speedup else args.skip
    plan = plan_uniform_skip(num_blocks, skip) if skip else DropConfig()
    if args.attention or args.mlp or args.blocks:
        calibration = text.blocks(
            tokenizer, split="calibration", block_len=args.block_len, n_tokens=args.tokens
        )
        importance = layer_importance(
            model, calibration, LayerImportanceConfig(batch_size=args.batch_size), progress=True
        )
        plan = plan.union(
            plan_most_redundant(
                importance, attention=args.attention, mlp=args.mlp, blocks=args.blocks
            )
        )
    return DropConfig(**plan.indices(), keep_weights=not args.free_weights)


def _summary(args: argparse.Namespace, num_blocks: int, dropped, dense, after, n_tokens: int):
    """Print what was dropped and the perplexity before and after; the report's dict."""
    from moefy.cli.show import console, print_table

    print_table(
        f"dropped from {args.model} ({num_blocks} blocks)",
        [
            {"part": part, "count": len(indices), "blocks": ", ".join(map(str, indices)) or "-"}
            for part, indices in dropped.indices().items()
        ],
    )
    if dense and after:
        console().print(
            f"perplexity: dense {dense.perplexity:.3f} -> dropped {after.perplexity:.3f} "
            f"(x{after.perplexity / dense.perplexity:.3f})"
        )
    return {
        "model": args.model,
        "num_blocks": num_blocks,
        "dropped": dropped.to_dict(),
        "perplexity_dense": dense.perplexity if dense else None,
        "perplexity_dropped": after.perplexity if after else None,
        "eval_tokens": n_tokens,
    }
