"""``moefy sparsify``: training-free activation sparsity, measured on evaluation text, saved."""

from __future__ import annotations

import argparse

from moefy.cli.args import (
    add_device_and_dtype,
    add_model_and_data,
    add_output,
    claimed_output,
    device_and_dtype,
    positive_int,
)

HELP = "sparsify activations without training (topk, teal, wina, cats, chess); measure and save"

METHODS = ("topk", "teal", "wina", "cats", "chess")
REPORT_FILE = "sparsify_report.json"


def _sparsity(text: str) -> float:
    """argparse type: a float in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_data(parser, tokens=16384)
    add_device_and_dtype(parser)
    parser.add_argument("--method", choices=METHODS, default="teal", help="sparsity method")
    parser.add_argument(
        "--sparsity",
        type=_sparsity,
        default=0.5,
        help="target share of the method's activations set to zero, in [0, 1)",
    )
    parser.add_argument(
        "--attention",
        action="store_true",
        help="teal, wina: also sparsify the inputs of the attention projections",
    )
    parser.add_argument(
        "--no-greedy",
        action="store_true",
        help="teal, wina: the same sparsity for every linear layer instead of TEAL's greedy "
        "allocation inside each block",
    )
    parser.add_argument(
        "--calibration-passes",
        type=positive_int,
        default=None,
        help="passes over the calibration text (default 2: dense, then refined in the sparse one)",
    )
    parser.add_argument(
        "--eval-tokens",
        type=positive_int,
        default=8192,
        help="tokens of evaluation text for the measured sparsity and perplexity",
    )
    add_output(parser, "output folder for the sparse model", default="runs/sparsify")


def _refuse_changed_model(model: object, name: str) -> None:
    """A moefied, sparsified or MLP-dropped model cannot be sparsified: say what to give."""
    from moefy.arch import find_ffns
    from moefy.errors import MoefyError
    from moefy.moe import moe_layers
    from moefy.sparsify.wrappers import sparse_modules

    if moe_layers(model):
        raise MoefyError(
            f"{name} is a moefied model: sparsify the dense model it was converted from (e.g. "
            "--model smollm2-135m), or compare both with moefy sweep --methods teal,moe-oracle"
        )
    if next(sparse_modules(model), None) is not None:
        raise MoefyError(
            f"{name} is sparsified already: sparsify the dense model it was made from (e.g. "
            "--model smollm2-135m) with the new settings"
        )
    find_ffns(model)  # a one-line error for dropped MLPs or an unsupported architecture


def _config_fields(args: argparse.Namespace) -> dict[str, object]:
    fields: dict[str, object] = {"method": args.method, "sparsity": args.sparsity}
    if args.method != "topk":
        fields["batch_size"] = args.batch_size
        if args.calibration_passes is not None:
            fields["calibration_passes"] = args.calibration_passes
    if args.attention:
        fields["attention"] = True
    if args.no_greedy:
        fields["greedy"] = False
    return fields


def run(args: argparse.Namespace) -> int:
    with claimed_output(args, "folder"):  # checked before any work, locked while it runs
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moefy import dist
    from moefy.cli.show import console, esc, print_table, status
    from moefy.data.text import load_text
    from moefy.errors import MoefyError
    from moefy.eval.perplexity import perplexity
    from moefy.models.load import is_causal_lm, load_model
    from moefy.sparsify import (
        check_calibration_text,
        config_from_dict,
        measure,
        measured_sparsity,
        reset_counters,
        save_sparse,
        sparsify_,
    )

    try:
        config = config_from_dict(_config_fields(args))
    except MoefyError as err:
        raise MoefyError(
            f"{err} (--attention and --no-greedy apply to teal and wina only)"
        ) from None
    out = Path(args.out)
    device, dtype = device_and_dtype(args)
    dist.init_from_env(device)
    main = dist.is_main_process()
    text = load_text(args.data)  # a bad --data fails before the model loads
    with status(f"loading {args.model}"):
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
        _refuse_changed_model(model, args.model)  # before any evaluation
        calibration = None
        if config.needs_calibration:
            calibration = text.blocks(
                tokenizer, split="calibration", block_len=args.block_len, n_tokens=args.tokens
            )
        check_calibration_text(config, calibration, option="--tokens")  # before the dense pass
        evaluation = text.blocks(
            tokenizer, split="evaluation", block_len=args.block_len, n_tokens=args.eval_tokens
        )
    causal = is_causal_lm(model)
    dense = perplexity(model, evaluation, args.batch_size, progress=True) if causal else None
    report = sparsify_(model, config, calibration, progress=True)
    if causal:
        reset_counters(model)
        sparse = perplexity(model, evaluation, args.batch_size, progress=True)
        measured = measured_sparsity(model)
    else:
        sparse = None
        measured = measure(model, evaluation, args.batch_size, progress=True)
    if not main:
        return 0
    print_table(
        f"{config.method} at target {config.sparsity:.0%}: measured on {measured.n_tokens} tokens "
        f"of {args.data} evaluation text",
        measured.table_rows(),
    )
    summary = {
        "method": config.method,
        "target_sparsity": config.sparsity,
        "measured_weight_sparsity": measured.total,
        "measured_activation_sparsity": measured.activation_sparsity,
        "perplexity_dense": dense.perplexity if dense else None,
        "perplexity_sparse": sparse.perplexity if sparse else None,
        "calibration_seconds": report.seconds,
    }
    console().print(
        f"weights skipped: [bold]{measured.total:.1%}[/bold] of the targeted weight reads "
        f"(zero activations {measured.activation_sparsity:.1%})"
    )
    if dense and sparse:
        console().print(
            f"perplexity: dense {dense.perplexity:.3f} -> sparse {sparse.perplexity:.3f} "
            f"(x{sparse.perplexity / dense.perplexity:.3f})"
        )
    save_sparse(
        model,
        out,
        tokenizer=tokenizer,
        overwrite=args.overwrite,
        extra_json={
            REPORT_FILE: {**summary, "report": report.to_dict(), "measured": measured.to_dict()}
        },
    )
    console().print(
        f"sparse model written to [bold]{esc(out)}[/bold] (load with moefy.sparsify.load_sparse)"
    )
    return 0
