"""``moefy convert``: split every dense FFN into experts (MoEfication) and save the model."""

from __future__ import annotations

import argparse

from moefy.cli.args import (
    add_device_and_dtype,
    add_output,
    device_and_dtype,
    positive_int,
    run_claimed,
)

HELP = "split each dense FFN into experts (random, params or coactivation) and save the model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="smollm2-135m", help="built-in name or a local Hugging Face folder"
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--experts", type=positive_int, help="experts per FFN layer (default 64)")
    size.add_argument("--expert-size", type=positive_int, help="neurons per expert")
    parser.add_argument(
        "--method",
        choices=("random", "params", "coactivation"),
        default="params",
        help="how neurons are grouped into experts",
    )
    parser.add_argument(
        "--profile",
        default=None,
        help="profile folder with co-activation counts (moefy profile --coactivation); "
        "needed by --method coactivation",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument(
        "--size-multiple",
        type=positive_int,
        default=1,
        help="round expert sizes up to this multiple (8 or 16 suit kernels); pads with zeros",
    )
    add_output(parser, "output folder of the moefied model", default="runs/moe")
    add_device_and_dtype(parser)


def run(args: argparse.Namespace) -> int:
    return run_claimed(args, _run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moefy.cli.show import console, esc, print_table, status
    from moefy.errors import MoefyError
    from moefy.models.load import load_model
    from moefy.moe import MoEfyConfig, moe_layers, moefy_, save
    from moefy.profiling import SparsityProfile

    default_experts = 64
    experts = args.experts or (default_experts if args.expert_size is None else None)
    config = MoEfyConfig(
        num_experts=experts,
        expert_size=args.expert_size,
        method=args.method,
        seed=args.seed,
        size_multiple=args.size_multiple,
    )
    if args.method == "coactivation" and not args.profile:
        raise MoefyError(
            "--method coactivation needs --profile (a folder from moefy profile --coactivation)"
        )
    device, dtype = device_and_dtype(args)
    profile = SparsityProfile.load(args.profile) if args.profile else None
    with status(f"loading {args.model}"):
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    if moe_layers(model):
        raise MoefyError(
            f"{args.model} is a moefied model already: convert the dense model it was made "
            "from (e.g. --model smollm2-135m)"
        )
    moefy_(model, config, profile=profile, progress=True)
    out = save(model, Path(args.out), tokenizer=tokenizer, overwrite=args.overwrite)
    layers = moe_layers(model)
    rows = [
        {
            "layer": moe.layer_index,
            "experts": moe.num_experts,
            "expert size": moe.expert_size,
            "neurons": int((moe.perm >= 0).sum()),
        }
        for moe in layers[:: max(1, len(layers) // 6)]
    ]
    print_table(f"{args.model}: {len(layers)} FFN layers split by {args.method}", rows)
    console().print(f"moefied model written to [bold]{esc(out)}[/bold]")
    return 0
