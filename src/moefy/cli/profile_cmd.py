"""``moefy profile``: measure the activation sparsity of every FFN layer."""

from __future__ import annotations

import argparse

from moefy.cli.args import (
    add_device_and_dtype,
    add_model_and_data,
    add_output,
    device_and_dtype,
    float_type,
    non_negative_int,
    open_unit_float,
    run_claimed,
)

HELP = "measure activation sparsity per FFN layer; write a profile, a table and plots"

# argparse type of --top-share: a share in (0, 1]
_top_share = float_type("in (0, 1]", lambda value: 0.0 < value <= 1.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_data(parser, tokens=65536)
    add_device_and_dtype(parser)
    add_output(parser, "output folder for the profile", default="runs/profile")
    parser.add_argument(
        "--active-rule",
        choices=("contribution", "nonzero", "magnitude"),
        default="contribution",
        help="what makes a neuron 'active' for a token (default: in the smallest set carrying "
        "--active-share of the FFN output mass)",
    )
    parser.add_argument(
        "--active-share",
        type=open_unit_float,
        default=0.9,
        help="output-mass share for the contribution rule",
    )
    parser.add_argument(
        "--coactivation",
        action="store_true",
        help="also count neuron co-activation (d_ff x d_ff per layer, kept on disk; needed by "
        "'moefy convert --method coactivation')",
    )
    parser.add_argument(
        "--top-share",
        type=_top_share,
        default=0.1,
        help="activation rates: a neuron is 'top' for a token when its |h| is among the "
        "token's ceil(top-share * d_ff) largest (default: 0.1)",
    )
    parser.add_argument(
        "--pattern-tokens",
        type=non_negative_int,
        default=512,
        help="evenly spaced tokens whose per-neuron contribution shares are kept as activation "
        "patterns (needed by 'moefy convert --method activation'; 0: keep none; default: 512)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def run(args: argparse.Namespace) -> int:
    return run_claimed(args, _run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moefy import dist
    from moefy.cli.show import console, esc, print_table, status
    from moefy.data.text import load_text
    from moefy.models.load import load_model
    from moefy.moe import moe_layers, unmoefy
    from moefy.profiling import ProfileConfig, profile, write_plots

    config = ProfileConfig(
        batch_size=args.batch_size,
        active_rule=args.active_rule,
        active_share=args.active_share,
        coactivation=args.coactivation,
        top_share=args.top_share,
        pattern_tokens=args.pattern_tokens,
        progress=True,
    )
    out = Path(args.out)
    device, dtype = device_and_dtype(args)
    dist.init_from_env(device)
    text = load_text(args.data)  # a bad --data fails before the model loads
    with status(f"loading {args.model}"):
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
        blocks = text.blocks(
            tokenizer, split="calibration", block_len=args.block_len, n_tokens=args.tokens
        )
    if moe_layers(model):
        # Every expert together computes the dense FFN exactly (neurons regrouped, none lost), so
        # the moefied model is profiled as that FFN; the profile then fits its dense model too.
        unmoefy(model)
        console().print(
            f"{args.model} is a moefied model: profiling the neurons of its experts "
            "(every expert, in the dense model's neuron order)",
            markup=False,
        )
    result = profile(model, blocks, config)
    if not dist.is_main_process():
        return 0
    result.save(out, overwrite=args.overwrite)
    rows = result.table_rows()
    print_table(
        f"FFN activation sparsity: {args.model} on {blocks.n_tokens} tokens of {args.data}", rows
    )
    console().print(f"profile written to [bold]{esc(out)}[/bold]")
    if not args.no_plots:
        plots = write_plots(result, out / "plots")
        console().print(f"{len(plots)} plots written to [bold]{esc(out / 'plots')}[/bold]")
    return 0
