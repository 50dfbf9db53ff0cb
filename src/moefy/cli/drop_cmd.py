"""``moefy drop``: drop the most redundant layers (or skip middle blocks), measure, save."""

from __future__ import annotations

import argparse
import math

from moefy.cli.args import (
    add_device_and_dtype,
    add_model_and_data,
    add_output,
    claimed_output,
    device_and_dtype,
    non_negative_int,
    positive_int,
)

HELP = "drop the most redundant attention/MLP layers or blocks, or skip middle blocks; save"

REPORT_FILE = "drop_report.json"


def _speedup(text: str) -> float:
    """argparse type: a finite number >= 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 1.0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 1, got {value}")
    return value


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
    parser.add_argument(
        "--eval-tokens",
        type=positive_int,
        default=4096,
        help="tokens of evaluation text for the perplexity before and after",
    )
    add_output(parser, "output folder for the dropped model", default="runs/drop")


def run(args: argparse.Namespace) -> int:
    with claimed_output(args, "folder"):  # checked before any work, locked while it runs
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moefy.cli.show import console, esc, print_table, status
    from moefy.data.text import load_text
    from moefy.errors import MoefyError
    from moefy.eval.perplexity import perplexity
    from moefy.layers import (
        DropConfig,
        blocks_for_speedup,
        check_drop,
        drop_layers_,
        find_layers,
        layer_importance,
        plan_most_redundant,
        plan_uniform_skip,
        save_dropped,
    )
    from moefy.layers.config import LayerImportanceConfig
    from moefy.models.load import is_causal_lm, load_model

    by_similarity = args.attention or args.mlp or args.blocks
    if not (by_similarity or args.skip or args.speedup):
        raise MoefyError("nothing to drop: give --attention, --mlp, --blocks, --skip or --speedup")
    device, dtype = device_and_dtype(args)
    with status(f"loading {args.model}"):
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
        num_blocks = len(find_layers(model))
        text = load_text(args.data)
        evaluation = text.blocks(
            tokenizer, split="evaluation", block_len=args.block_len, n_tokens=args.eval_tokens
        )
    for flag, n in (
        ("--attention", args.attention),
        ("--mlp", args.mlp),
        ("--blocks", args.blocks),
    ):
        if n > num_blocks:
            raise MoefyError(f"{flag} {n}: the model has only {num_blocks} blocks")
    skip = blocks_for_speedup(num_blocks, args.speedup) if args.speedup else args.skip
    plan = plan_uniform_skip(num_blocks, skip) if skip else DropConfig()
    if by_similarity:
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
    plan = DropConfig(**plan.indices(), keep_weights=not args.free_weights)
    check_drop(model, plan)  # before the perplexity runs
    causal = is_causal_lm(model)
    dense = perplexity(model, evaluation, args.batch_size, progress=True) if causal else None
    dropped = drop_layers_(model, **plan.indices(), keep_weights=not args.free_weights)
    after = perplexity(model, evaluation, args.batch_size, progress=True) if causal else None
    print_table(
        f"dropped from {args.model} ({num_blocks} blocks)",
        [
            {"part": part, "count": len(indices), "blocks": ", ".join(map(str, indices)) or "-"}
            for part, indices in dropped.indices().items()
        ],
    )
    summary = {
        "model": args.model,
        "num_blocks": num_blocks,
        "dropped": dropped.to_dict(),
        "perplexity_dense": dense.perplexity if dense else None,
        "perplexity_dropped": after.perplexity if after else None,
        "eval_tokens": evaluation.n_tokens,
    }
    if dense and after:
        console().print(
            f"perplexity: dense {dense.perplexity:.3f} -> dropped {after.perplexity:.3f} "
            f"(x{after.perplexity / dense.perplexity:.3f})"
        )
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
