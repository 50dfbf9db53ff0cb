"""``moefy train-routers``: fit a router per MoE layer, save the routed model, evaluate it."""

from __future__ import annotations

import argparse

from moefy.cli.args import (
    RESULTS_HELP,
    add_device_and_dtype,
    add_model_and_data,
    add_output,
    claimed_output,
    device_and_dtype,
    float_list,
    non_negative_int,
    positive_int,
)

# The training report, written next to the routed model (not needed to load it).
REPORT_FILE = "router_report.json"

HELP = "train a router per MoE layer (mlp, linear or centroid), save the model, rate the routers"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_data(parser, tokens=16384)
    parser.set_defaults(model="runs/moe")
    add_device_and_dtype(parser)
    parser.add_argument(
        "--router", choices=("mlp", "linear", "centroid"), default="mlp", help="router type"
    )
    parser.add_argument("--hidden", type=positive_int, default=128, help="mlp router width")
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
    parser.add_argument(
        "--eval-tokens",
        type=non_negative_int,
        default=0,
        help="evaluation tokens for the perplexity table (0: skip evaluation)",
    )
    parser.add_argument(
        "--fractions",
        type=float_list,
        default=(0.5, 0.25, 0.125),
        help="comma-separated top-k shares of experts to evaluate",
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
    with claimed_output(args, "folder"):  # checked before any work, locked while it runs
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from moefy.cli.show import console, esc, print_table, status
    from moefy.data.text import load_text
    from moefy.dist import init_from_env, is_main_process
    from moefy.errors import MoefyError
    from moefy.models.load import load_model
    from moefy.moe import moe_layers, save
    from moefy.routing import RouterConfig, route_quality, train_routers

    if any(not 0.0 < v <= 1.0 for v in (*args.fractions, *args.taus)):
        raise MoefyError("--fractions and --taus must lie in (0, 1]")
    config = RouterConfig(
        router=args.router,
        hidden=args.hidden,
        loss=args.loss,
        epochs=args.epochs,
        tokens_per_layer=args.tokens,
        forward_batch_size=args.batch_size,
        seed=args.seed,
        rounds=args.rounds,
    )
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
        print_table(
            f"{args.router} routers on {report.n_tokens} tokens of {args.data} "
            f"({report.seconds:.0f} s): held-out quality at top "
            f"{100 * config.report_fraction:g} % of experts",
            report.rows(),
        )
        out = save(model, Path(args.out), tokenizer=tokenizer, overwrite=args.overwrite)
        (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1))
        console().print(f"routed model and {REPORT_FILE} written to [bold]{esc(out)}[/bold]")
    if args.eval_tokens > 0:
        from moefy.eval.perplexity import perplexity
        from moefy.moe import set_selection

        evaluation = text.blocks(tokenizer, "evaluation", args.block_len, args.eval_tokens)
        layers = moe_layers(model)
        previous = [moe.selector.to_dict() for moe in layers]
        set_selection(model)  # every expert: the dense reference
        dense = perplexity(model, evaluation, batch_size=args.batch_size).perplexity
        rows = route_quality(
            model,
            evaluation,
            fractions=args.fractions,
            taus=args.taus,
            dense_perplexity=dense,
            batch_size=args.batch_size,
            progress=main,
        )
        recall = report.mean_recall
        for row in rows:
            row["recall"] = recall
        if args.oracle:
            from moefy.moe import OracleSelector

            routers = [moe.selector for moe in layers]
            for moe in layers:
                moe.selector = OracleSelector(moe.num_experts)
            try:
                rows += route_quality(
                    model,
                    evaluation,
                    fractions=args.fractions,
                    taus=args.taus,
                    dense_perplexity=dense,
                    batch_size=args.batch_size,
                    progress=main,
                )
            finally:
                for moe, router in zip(layers, routers, strict=True):
                    moe.selector = router
        for moe, old in zip(layers, previous, strict=True):
            moe.selector.set_topk(k=old["k"], fraction=old["fraction"])
        oracle = {(r["rule"], r["level"]): r["perplexity"] for r in rows if "oracle" in r["method"]}
        for row in rows:
            row.update(model=args.model, data=args.data, eval_tokens=evaluation.n_tokens)
        if main:
            from moefy.results import add_rows

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
    return 0
