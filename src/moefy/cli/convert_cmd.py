"""``moefy convert``: split every dense FFN into experts (MoEfication) and save the model.

The ``--method`` choices are the registered split methods
(:func:`moefy.moe.register_split_method`), read when they are first needed, so ``--help``
imports no torch. With ``--shared`` the first experts of each layer hold the neurons a profile
found most often active and run for every token; ``--router`` fits a router on calibration text
right after the split (closed-form routers such as ``analytic`` or ``lstsq`` fit in one step).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from moefy.cli.args import (
    add_device_and_dtype,
    add_model_and_data,
    add_output,
    device_and_dtype,
    float_type,
    positive_int,
    run_claimed,
)

HELP = "split each dense FFN into experts (shared and routed) and save the model"
DEFAULT_EXPERTS = 64
# moefy.moe.config.SHARED_RULES, spelled out so that --help does not import torch
SHARED_RULES = ("fixed", "profile")
CALIBRATION_TOKENS = 4096


class _SplitMethodNames:
    """The registered split methods as argparse ``choices``, read from the registry when first
    asked (parsing or the ``--help`` text), not when the parser is built."""

    def _names(self) -> list[str]:
        from moefy.moe.split import SPLIT_METHODS

        return SPLIT_METHODS.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()


# argparse type: a share of experts in [0, 1)
_shared_share = float_type("in [0, 1)", lambda value: 0.0 <= value < 1.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_data(parser, tokens=CALIBRATION_TOKENS)
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--experts", type=positive_int, help=f"experts per FFN layer (default {DEFAULT_EXPERTS})"
    )
    size.add_argument("--expert-size", type=positive_int, help="neurons per expert")
    parser.add_argument(
        "--method",
        choices=_SplitMethodNames(),
        metavar="METHOD",
        default="params",
        help="how neurons are grouped into experts: %(choices)s (default %(default)s; "
        "moefy splits compares them)",
    )
    parser.add_argument(
        "--profile",
        default=None,
        help="profile folder from moefy profile: needed by --shared and by the methods that "
        "read co-activation counts (moefy profile --coactivation) or activation patterns",
    )
    parser.add_argument(
        "--shared",
        type=_shared_share,
        default=0.0,
        help="share of each layer's experts that are shared (always run), in [0, 1); they hold "
        "the neurons most often active in --profile",
    )
    parser.add_argument(
        "--shared-rule",
        choices=SHARED_RULES,
        default="fixed",
        help="fixed: round(shared x experts) shared experts per layer; profile: per layer, the "
        "neurons at least twice as often active as the average one (at most --shared)",
    )
    parser.add_argument(
        "--router",
        default=None,
        metavar="NAME",
        help="fit this router (e.g. analytic, lstsq, centroid) on --tokens of --data after "
        "the split; the model is saved with it",
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

    from moefy.cli.show import console, esc, status
    from moefy.errors import MoefyError
    from moefy.models.load import load_model
    from moefy.moe import moe_layers, moefy_, save
    from moefy.profiling import SparsityProfile

    config = _moefy_config(args)
    router_config = _router_config(args)
    text = _calibration_text(args) if router_config is not None else None
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
    if router_config is not None:
        _fit_routers(args, model, tokenizer, text, router_config)
    out = save(model, Path(args.out), tokenizer=tokenizer, overwrite=args.overwrite)
    _show_layers(args, moe_layers(model))
    console().print(f"moefied model written to [bold]{esc(out)}[/bold]")
    return 0


def _moefy_config(args: argparse.Namespace):
    """The :class:`moefy.moe.MoEfyConfig` the options ask for; refuses a missing --profile."""
    from moefy.errors import MoefyError
    from moefy.moe import SPLIT_METHODS, MoEfyConfig

    experts = args.experts or (DEFAULT_EXPERTS if args.expert_size is None else None)
    config = MoEfyConfig(
        num_experts=experts,
        expert_size=args.expert_size,
        method=args.method,
        seed=args.seed,
        size_multiple=args.size_multiple,
        shared=args.shared,
        shared_rule=args.shared_rule,
    )
    method = SPLIT_METHODS.get(args.method).value
    if not args.profile:
        if method.needs_coactivation:
            raise MoefyError(
                f"--method {args.method} needs --profile (a folder from moefy profile "
                "--coactivation)"
            )
        if method.needs_patterns:
            raise MoefyError(
                f"--method {args.method} needs --profile (a folder from moefy profile)"
            )
        if args.shared > 0 or args.shared_rule == "profile":
            raise MoefyError(
                "shared experts (--shared, --shared-rule profile) need --profile (a folder from "
                "moefy profile): they hold the neurons most often active there"
            )
    return config


def _router_config(args: argparse.Namespace):
    """The :class:`moefy.routing.RouterConfig` of ``--router``, or None without it."""
    if args.router is None:
        return None
    from moefy.errors import MoefyError
    from moefy.routing import ROUTERS, RouterConfig

    if args.router not in ROUTERS:
        raise MoefyError(
            f"--router {args.router!r} is unknown (known: {', '.join(ROUTERS.names())})"
        )
    return RouterConfig(
        router=args.router,
        tokens_per_layer=args.tokens,
        forward_batch_size=args.batch_size,
        seed=args.seed,
    )


def _calibration_text(args: argparse.Namespace):
    """The ``--data`` text, read before the model loads so that a bad name fails first."""
    from moefy.data.text import load_text

    return load_text(args.data)


def _fit_routers(args: argparse.Namespace, model, tokenizer, text, router_config) -> None:
    """Fit ``--router`` on ``--tokens`` of calibration text and print its held-out recall."""
    from moefy.cli.show import console, esc
    from moefy.routing import train_routers

    blocks = text.blocks(tokenizer, "calibration", args.block_len, args.tokens)
    report = train_routers(model, blocks, router_config, progress=True)
    console().print(
        f"{esc(args.router)} routers fitted on {report.n_tokens} tokens of {esc(args.data)} "
        f"({report.seconds:.0f} s): held-out recall {report.mean_recall:.3f} at top "
        f"{100 * router_config.report_fraction:g} % of experts"
    )


def _show_layers(args: argparse.Namespace, layers: list) -> None:
    """A table of the converted layers (a few of them when all are alike): experts, shared
    experts, sizes."""
    from moefy.cli.show import print_table

    alike = len({moe.num_shared for moe in layers}) == 1
    shown = layers[:: max(1, len(layers) // 6)] if alike else layers
    rows = [
        {
            "layer": moe.layer_index,
            "experts": moe.num_experts,
            "shared": moe.num_shared,
            "expert size": moe.expert_size,
            "neurons": int((moe.perm >= 0).sum()),
        }
        for moe in shown
    ]
    shared = sum(moe.num_shared for moe in layers)
    title = f"{args.model}: {len(layers)} FFN layers split by {args.method}"
    if shared:
        title += f", {shared} shared experts in all"
    print_table(title, rows)
