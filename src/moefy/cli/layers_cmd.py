"""``moefy layers``: how redundant each block, attention sublayer and MLP is (table, plots)."""

from __future__ import annotations

import argparse

from moefy.cli.args import (
    add_device_and_dtype,
    add_eval_tokens,
    add_model_and_data,
    add_output,
    device_and_dtype,
    run_claimed,
)

HELP = "score every block, attention and MLP layer by redundancy (LLM-Drop similarity, perplexity)"

IMPORTANCE_FILE = "importance.json"
SHOWN_MOST_REDUNDANT = 4  # block numbers listed per part under the table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_data(parser, tokens=8192)
    add_device_and_dtype(parser)
    parser.add_argument(
        "--perplexity",
        action="store_true",
        help="also measure the evaluation perplexity with each part removed on its own "
        "(three perplexity runs per block: slow on deep models)",
    )
    add_eval_tokens(parser, "tokens of evaluation text for --perplexity", default=4096)
    add_output(parser, "output folder (JSON and plots)", default="runs/layers")


def run(args: argparse.Namespace) -> int:
    return run_claimed(args, _run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moefy.cli.show import console, esc, print_table, status
    from moefy.data.text import load_text
    from moefy.io import FOLDER, atomic_path
    from moefy.layers import LayerImportanceConfig, layer_importance
    from moefy.models.load import load_model

    device, dtype = device_and_dtype(args)
    config = LayerImportanceConfig(batch_size=args.batch_size, perplexity=args.perplexity)
    with status(f"loading {args.model}"):
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
        text = load_text(args.data)
        calibration = text.blocks(
            tokenizer, split="calibration", block_len=args.block_len, n_tokens=args.tokens
        )
        evaluation = None
        if config.perplexity:
            evaluation = text.blocks(
                tokenizer, split="evaluation", block_len=args.block_len, n_tokens=args.eval_tokens
            )
    importance = layer_importance(model, calibration, config, eval_data=evaluation, progress=True)
    title = f"layer redundancy of {args.model} on {importance.n_tokens} tokens of {args.data}"
    if importance.has_perplexity:
        title += f" (dense perplexity {importance.dense_perplexity:.3f}; dppl = increase)"
    print_table(title, importance.rows())
    shown = min(SHOWN_MOST_REDUNDANT, importance.num_blocks)
    for part in ("attention", "mlp", "block"):
        console().print(f"most redundant {part}: {importance.most_redundant(part, shown)}")
    out = Path(args.out)
    with atomic_path(out, FOLDER, overwrite=args.overwrite) as staging:  # JSON and plots at once
        staging.mkdir()
        importance.save(staging / IMPORTANCE_FILE)
        plots = [out / path.name for path in importance.plot(staging)]
    console().print(
        f"written: [bold]{esc(out / IMPORTANCE_FILE)}[/bold], "
        + ", ".join(esc(path) for path in plots)
    )
    return 0
