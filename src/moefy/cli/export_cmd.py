"""``moefy export``: write a moefied model as a standard MoE checkpoint (transformers Qwen2-MoE
folder or llama.cpp GGUF) and check it against moefy's own model.

The routers are fitted on ``--tokens`` of calibration text; the check loads what was written
with plain transformers and prints its perplexity next to moefy's routed model on
``--eval-tokens`` of evaluation text (0 skips it).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from moefy.cli.args import (
    add_eval_tokens,
    add_model_and_data,
    add_output,
    float_type,
    positive_float,
)

HELP = "write a moefied model as a transformers Qwen2-MoE folder or a llama.cpp GGUF file"
CALIBRATION_TOKENS = 4096
EVAL_TOKENS = 4096
# moefy.export.routing.ROUTER_TARGETS and the formats' dtypes, spelled out so --help needs no torch
ROUTER_TARGETS = ("router", "oracle")
DTYPES = ("fp32", "fp16", "bf16", "q8_0")

_keep_share = float_type("in (0, 1]", lambda value: 0.0 < value <= 1.0)


class _FormatNames:
    """The registered export formats as argparse ``choices``, read when first asked."""

    def _names(self) -> list[str]:
        from moefy.export import EXPORT_FORMATS

        return EXPORT_FORMATS.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_data(parser, tokens=CALIBRATION_TOKENS)
    parser.add_argument(
        "--format",
        choices=_FormatNames(),
        metavar="FORMAT",
        default="hf",
        help="%(choices)s (default %(default)s): a transformers folder or one GGUF file",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="stored dtype (default %(default)s; q8_0 for gguf only)",
    )
    parser.add_argument(
        "--keep",
        type=_keep_share,
        default=None,
        help="share of each layer's experts a token runs, shared ones included (moefy's "
        "set_routing keep); default: the model's own top-k, which must be one for every layer",
    )
    parser.add_argument(
        "--target",
        choices=ROUTER_TARGETS,
        default="router",
        help="what the exported linear router imitates: the model's own router (default) or "
        "the oracle (true expert norms)",
    )
    parser.add_argument(
        "--logit-spread",
        type=positive_float,
        default=None,
        help="per-token rms of the exported router logits (default 1e-3): larger makes the "
        "top-k robust to other engines' rounding, at softmax weights further from uniform",
    )
    add_eval_tokens(
        parser,
        "tokens of evaluation text for the perplexity check (0: no check)",
        default=EVAL_TOKENS,
        may_skip=True,
    )
    add_output(parser, "output folder (hf) or file (gguf)", default=None)


def run(args: argparse.Namespace) -> int:
    from moefy.errors import MoefyError
    from moefy.export.api import resolve_format

    if args.out is None:
        raise MoefyError("--out is required: the folder (hf) or file (gguf) to write")
    try:
        resolve_format(args.format, args.dtype)  # before the output is claimed
    except MoefyError as err:
        raise MoefyError(f"--format {args.format} --dtype {args.dtype}: {err}") from None
    kind = "file" if args.format == "gguf" else "folder"
    from moefy.cli.args import claimed_output

    with claimed_output(args, kind):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from moefy.cli.show import console, esc, status
    from moefy.data.text import load_text
    from moefy.export import compare_export, export
    from moefy.export.qwen2_moe import plan_export
    from moefy.models.load import load_model
    from moefy.routing import set_routing

    text = load_text(args.data)  # a bad name fails before the model loads
    with status(f"loading {args.model}"):
        model, tokenizer = load_model(args.model, dtype="fp32", device="cpu")
    plan_export(model)  # a model without a Qwen2-MoE counterpart is refused before any work
    if args.keep is not None:
        set_routing(model, "topk", keep=args.keep)
    blocks = text.blocks(tokenizer, "calibration", args.block_len, args.tokens)
    with status(f"fitting routers and writing {args.format}"):
        report = export(
            model,
            args.out,
            format=args.format,
            tokenizer=tokenizer,
            data=blocks,
            dtype=args.dtype,
            target=args.target,
            overwrite=args.overwrite,
            batch_size=args.batch_size,
            logit_spread=args.logit_spread,
        )
    _show_export(args, report)
    if args.eval_tokens:
        evaluation = text.blocks(tokenizer, "evaluation", args.block_len, args.eval_tokens)
        with status("checking: perplexity of moefy's model and of the export"):
            check = compare_export(model, report, evaluation, batch_size=args.batch_size)
        _show_check(args, report, check)
    console().print(f"exported to [bold]{esc(report.path)}[/bold]")
    return 0


def _show_export(args: argparse.Namespace, report) -> None:
    from moefy.cli.show import console, esc

    fit = report.router
    line = (
        f"Qwen2-MoE ({esc(args.format)}, {report.dtype}): {report.num_experts} routed experts, "
        f"{report.experts_per_token} per token, shared expert {report.shared_size} wide"
    )
    if report.dense_layers:
        line += f", dense layers {report.dense_layers}"
    console().print(line)
    if fit is not None and fit.n_tokens:
        console().print(
            f"linear routers fitted to the {fit.target} on {fit.n_tokens} tokens: held-out "
            f"recall {fit.mean_recall:.3f}, softmax weight error {fit.mean_weight_error:.2e}"
        )


def _show_check(args: argparse.Namespace, report, check) -> None:
    from moefy.cli.show import print_table

    k = report.experts_per_token
    rows = [
        {
            "model": "moefy (routed)",
            "routed experts per token": k,
            "perplexity": f"{check.moefy_perplexity:.3f}",
        },
        {
            "model": f"export ({args.format}, transformers)",
            "routed experts per token": k,
            "perplexity": f"{check.exported_perplexity:.3f}",
        },
    ]
    title = f"{check.n_tokens} evaluation tokens of {args.data}: ratio {check.ratio:.4f}"
    if check.max_logit_diff is not None:
        title += f", GGUF vs exported logits max |diff| {check.max_logit_diff:.2e}"
    print_table(title, rows)
