"""``moefy train-routers``: fit a router per MoE layer, save the routed model, evaluate it."""

from __future__ import annotations

import argparse

from moefy.cli.args import (
    RESULTS_HELP,
    add_device_and_dtype,
    add_eval_tokens,
    add_keep_option,
    add_model_and_data,
    add_output,
    device_and_dtype,
    float_list,
    keep_option,
    positive_int,
    run_claimed,
)

# The training report, written next to the routed model (not needed to load it).
REPORT_FILE = "router_report.json"
# moefy.routing.quality.DEFAULT_KEEP, spelled out so that --help does not import torch
DEFAULT_KEEP = (0.5, 0.25, 0.125)

# The built-in routers, for --help only (listing them from moefy.routing.ROUTERS would import
# torch); the value of --router is checked against the registry itself.
BUILTIN_ROUTERS = ("mlp", "linear", "centroid", "analytic", "lstsq")

HELP = "train or fit a router per MoE layer, save the model, rate the routers"


def router_name(text: str) -> str:
    """argparse type: a router registered in :data:`moefy.routing.ROUTERS`."""
    from moefy.routing import ROUTERS

    if text not in ROUTERS:
        raise argparse.ArgumentTypeError(
            f"unknown router {text!r} (known: {', '.join(ROUTERS.names())})"
        )
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_data(parser, tokens=16384)
    parser.set_defaults(model="runs/moe")
    add_device_and_dtype(parser)
    parser.add_argument(
        "--router",
        type=router_name,
        default="mlp",
        help=f"router type, a name in moefy.routing.ROUTERS (built in: {', '.join(BUILTIN_ROUTERS)}"
        "; analytic and lstsq are fitted in closed form, without training)",
    )
    parser.add_argument("--hidden", type=positive_int, default=128, help="mlp router width")
    parser.add_argument(
        "--representatives",
        type=positive_int,
        default=2,
        help="analytic router: representative neurons per expert (at most the expert size)",
    )
    parser.add_argument(
        "--loss",
        choices=("listwise", "mse"),
        default="listwise",
        help="training loss: listwise (share of the token's norm) or mse (log norms)",
    )
    parser.add_argument("--epochs", type=positive_int, default=8, help="passes over the data")
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="training rounds; rounds after the first learn from the inputs of the model routed "
        "by the last round's routers at 25 %% of experts",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    add_output(parser, "output folder of the model", default="runs/moe-routed")
    add_eval_tokens(
        parser,
        "evaluation tokens for the perplexity table (0: skip evaluation)",
        default=0,
        may_skip=True,
    )
    add_keep_option(
        parser,
        former="--fractions",
        type=float_list,
        default=DEFAULT_KEEP,
        help="comma-separated shares of experts kept per token (top-k) to evaluate",
    )
    parser.add_argument(
        "--taus",
        type=float_list,
        default=(0.9, 0.8),
        help="comma-separated dynamic-k shares of the predicted norm to evaluate",
    )
    parser.add_argument(
        "--oracle",
        action="store_true",
        help="also evaluate oracle selection at the same budgets (rows oracle-top*, oracle-dyn*)",
    )
    parser.add_argument("--results", default="runs/results.json", help=RESULTS_HELP)


def run(args: argparse.Namespace) -> int:
    import os

    from moefy.errors import MoefyError
    from moefy.results import check_results_file

    if os.path.realpath(args.out) == os.path.realpath(args.results):
        raise MoefyError(f"--out and --results both name {args.out}: give them different paths")
    check_results_file(args.results)  # rows are added at the end, under a lock of their own
    return run_claimed(args, _run)


def _run(args: argparse.Namespace) -> int:
    from moefy.cli.show import status
    from moefy.data.text import load_text
    from moefy.dist import init_from_env, is_main_process
    from moefy.errors import MoefyError
    from moefy.models.load import load_model
    from moefy.moe import moe_layers
    from moefy.routing import train_routers

    config = _router_config(args)
    device, dtype = device_and_dtype(args)
    init_from_env(device)
    main = is_main_process()
    with status(f"loading {args.model}"):
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
        if not moe_layers(model):
            raise MoefyError(f"{args.model} has no MoE layers: run moefy convert first")
        text = load_text(args.data)
        calibration = text.blocks(tokenizer, "calibration", args.block_len, args.tokens)
    report = train_routers(model, calibration, config, progress=main)
    if main:
        _show_and_save(args, model, tokenizer, report, config)
    if args.eval_tokens > 0:
        evaluation = text.blocks(tokenizer, "evaluation", args.block_len, args.eval_tokens)
        rows, dense = _quality_rows(args, model, evaluation, report.mean_recall, main)
        if main:
            _add_and_show(args, rows, dense)
    return 0


def _router_config(args: argparse.Namespace):
    """The :class:`moefy.routing.RouterConfig` the options ask for (budgets checked first)."""
    from moefy.errors import MoefyError
    from moefy.routing import RouterConfig

    if any(not 0.0 < v <= 1.0 for v in (*args.keep, *args.taus)):
        raise MoefyError(f"{keep_option(args)} and --taus must lie in (0, 1]")
    return RouterConfig(
        router=args.router,
        hidden=args.hidden,
        representatives=args.representatives,
        loss=args.loss,
        epochs=args.epochs,
        tokens_per_layer=args.tokens,
        forward_batch_size=args.batch_size,
        seed=args.seed,
        rounds=args.rounds,
    )


def _show_and_save(args: argparse.Namespace, model, tokenizer, report, config) -> None:
    """Print the training report, write the routed model and the report beside it."""
    import json
    from pathlib import Path

    from moefy.cli.show import console, esc, print_table
    from moefy.moe import save

    print_table(
        f"{args.router} routers on {report.n_tokens} tokens of {args.data} "
        f"({report.seconds:.0f} s): held-out quality at top "
        f"{100 * config.report_fraction:g} % of experts",
        report.rows(),
    )
    out = save(model, Path(args.out), tokenizer=tokenizer, overwrite=args.overwrite)
    (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1))
    console().print(f"routed model and {REPORT_FILE} written to [bold]{esc(out)}[/bold]")


def _quality_rows(args: argparse.Namespace, model, evaluation, recall: float, main: bool):
    """Perplexity rows of the routers (and of the oracle with ``--oracle``) at every budget,
    with the dense perplexity; the layers' top-k settings are put back after."""
    from moefy.eval.perplexity import perplexity
    from moefy.moe import moe_layers, set_selection
    from moefy.routing import route_quality

    layers = moe_layers(model)
    previous = [moe.selector.to_dict() for moe in layers]
    set_selection(model)  # every expert: the dense reference
    dense = perplexity(model, evaluation, batch_size=args.batch_size).perplexity
    settings = {
        "keep": args.keep,
        "taus": args.taus,
        "dense_perplexity": dense,
        "batch_size": args.batch_size,
        "progress": main,
    }
    rows = route_quality(model, evaluation, **settings)
    for row in rows:
        row["recall"] = recall
    if args.oracle:
        rows += _oracle_rows(model, evaluation, settings)
    for moe, old in zip(layers, previous, strict=True):
        moe.selector.set_topk(k=old["k"], fraction=old["fraction"])
    for row in rows:
        row.update(model=args.model, data=args.data, eval_tokens=evaluation.n_tokens)
    return rows, dense


def _oracle_rows(model, evaluation, settings: dict) -> list[dict]:
    """:func:`moefy.routing.route_quality` rows with oracle selection at the same budgets; the
    routers are put back after."""
    from moefy.moe import OracleSelector, moe_layers
    from moefy.routing import route_quality

    layers = moe_layers(model)
    routers = [moe.selector for moe in layers]
    for moe in layers:
        moe.selector = OracleSelector(moe.num_experts)
    try:
        return route_quality(model, evaluation, **settings)
    finally:
        for moe, router in zip(layers, routers, strict=True):
            moe.selector = router


def _add_and_show(args: argparse.Namespace, rows: list[dict], dense: float) -> None:
    """Add the rows to ``--results`` and print them, each against the dense model and the
    oracle at the same budget."""
    from moefy.cli.show import console, esc, print_table
    from moefy.results import add_rows

    oracle = {(r["rule"], r["level"]): r["perplexity"] for r in rows if "oracle" in r["method"]}
    add_rows(args.results, rows)
    shown = [
        {
            "method": r["method"],
            "active %": 100 * r["active_fraction"],
            "FFN FLOPs %": 100 * r["ffn_flops_ratio"],
            "perplexity": r["perplexity"],
            "x dense": r["ppl_ratio"],
            "x oracle": r["perplexity"] / oracle[(r["rule"], r["level"])]
            if (r["rule"], r["level"]) in oracle
            else float("nan"),
        }
        for r in rows
    ]
    print_table(f"{args.router} routers: perplexity (dense {dense:.3f})", shown)
    console().print(f"rows added to [bold]{esc(args.results)}[/bold]")
