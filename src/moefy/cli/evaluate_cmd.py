"""``moefy evaluate``: quality and measured cost of one model (dense or changed by moefy)."""

from __future__ import annotations

import argparse

from moefy.cli.args import (
    add_device_and_dtype,
    add_model_and_data,
    add_output,
    claimed_output,
    device_and_dtype,
)
from moefy.cli.sweep_cmd import add_evaluation_arguments, eval_config

HELP = "evaluate one model: perplexity, agreement with dense, classification, FLOPs per token"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_data(parser, tokens=8192)
    add_evaluation_arguments(parser)
    add_device_and_dtype(parser)
    parser.add_argument(
        "--dense",
        default=None,
        help="the dense model to compare with (needed for the agreement task and FLOPs share)",
    )
    add_output(parser, "write the report as JSON to this file", default=None)


def run(args: argparse.Namespace) -> int:
    with claimed_output(args, "file"):  # checked before any work, locked while it runs
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import dataclasses

    from moefy import dist
    from moefy.cli.show import console, esc, print_table, status
    from moefy.errors import MoefyError
    from moefy.eval import dense_reference, evaluate, evaluation_blocks
    from moefy.io import write_json
    from moefy.models.load import is_causal_lm, load_model

    config = eval_config(args, ("perplexity",))
    if "agreement" in config.tasks and args.dense is None:
        raise MoefyError("the agreement task compares with the dense model: pass --dense MODEL")
    device, dtype = device_and_dtype(args)
    dist.init_from_env(device)
    main = dist.is_main_process()
    with status(f"loading {args.model}"):
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    blocks = evaluation_blocks(tokenizer, config)
    reference = None
    if args.dense is not None and is_causal_lm(model):
        dense, _ = load_model(args.dense, dtype=dtype, device=device)
        reference = dense_reference(dense, blocks, config.agreement_tokens, config.batch_size)
        perplexity_only = dataclasses.replace(config, tasks=("perplexity",))
        reference.cost = evaluate(dense, perplexity_only, tokenizer, blocks=blocks).cost
        del dense
    report = evaluate(model, config, tokenizer, reference=reference, blocks=blocks, progress=main)
    if not main:
        return 0
    row = report.row()
    print_table(
        f"{args.model} on {args.data}",
        [{"measure": k, "value": v} for k, v in row.items() if v is not None],
    )
    if args.out:
        write_json(args.out, report.to_dict(), overwrite=args.overwrite)
        console().print(f"report written to [bold]{esc(args.out)}[/bold]")
    return 0
