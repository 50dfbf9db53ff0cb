"""``moefy sparsify``: training-free activation sparsity, measured on evaluation text, saved.

The ``--method`` choices, this command's help line and the method options (``--attention``,
``--no-greedy``, ``--calibration-passes``, ...) come from the registered methods
(:func:`moefy.sparsify.methods.register_sparsify_method`); reading them imports no torch.
"""

from __future__ import annotations

import argparse
from typing import Any

from moefy.cli.args import (
    add_device_and_dtype,
    add_eval_tokens,
    add_model_and_data,
    add_output,
    argparse_type,
    device_and_dtype,
    float_type,
    run_claimed,
)

DEFAULT_METHOD = "teal"
REPORT_FILE = "sparsify_report.json"


def method_names() -> list[str]:
    """The registered sparsify methods, in registration order."""
    from moefy.sparsify.config import SPARSIFY_METHODS

    return SPARSIFY_METHODS.names()


def __getattr__(name: str) -> Any:
    # HELP and METHODS are read from the registry when asked for, so that a method registered
    # after this module was imported is listed too.
    if name == "HELP":
        return (
            f"sparsify activations without training ({', '.join(method_names())}); measure and save"
        )
    if name == "METHODS":
        return tuple(method_names())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# argparse type: a float in [0, 1)
_sparsity = float_type("in [0, 1)", lambda value: 0.0 <= value < 1.0, finite=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_data(parser, tokens=16384)
    add_device_and_dtype(parser)
    parser.add_argument(
        "--method",
        choices=method_names(),
        default=DEFAULT_METHOD,
        help="sparsity method: " + "; ".join(f"{e.name}: {e.help}" for e in _method_entries()),
    )
    parser.add_argument(
        "--sparsity",
        type=_sparsity,
        default=0.5,
        help="target share of the method's activations set to zero, in [0, 1)",
    )
    _add_method_options(parser)
    add_eval_tokens(
        parser, "tokens of evaluation text for the measured sparsity and perplexity", default=8192
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


def _method_entries() -> list:
    from moefy.sparsify.config import SPARSIFY_METHODS

    return SPARSIFY_METHODS.entries()


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    """One option per config field the registered methods expose, once each."""
    from moefy.sparsify.methods import method_options, methods_taking

    for option in method_options():
        help_text = f"{', '.join(methods_taking(option))}: {option.help}"
        if option.parse is None:
            parser.add_argument(option.flag, action="store_true", help=help_text)
        else:
            parser.add_argument(
                option.flag, type=argparse_type(option.parse), default=None, help=help_text
            )


def _given(option, args: argparse.Namespace) -> bool:
    value = getattr(args, option.dest, None)
    return value is not None if option.parse is not None else bool(value)


def _config_fields(args: argparse.Namespace) -> dict[str, object]:
    """The config fields the arguments give; an option the method does not take is refused."""
    import dataclasses

    from moefy.errors import MoefyError
    from moefy.sparsify.methods import method_entry, method_options, methods_taking

    entry = method_entry(args.method)
    fields: dict[str, object] = {"method": args.method, "sparsity": args.sparsity}
    if "batch_size" in {f.name for f in dataclasses.fields(entry.meta["config_cls"])}:
        fields["batch_size"] = args.batch_size
    for option in method_options():
        if not _given(option, args):
            continue
        if option not in entry.meta["cli_options"]:
            takers = methods_taking(option)
            flags = [o.flag for o in method_options() if methods_taking(o) == takers]
            verb = "applies" if len(flags) == 1 else "apply"
            raise MoefyError(
                f"{args.method} takes no {option.flag} ({_and(flags)} {verb} to "
                f"{_and(takers)} only)"
            )
        fields[option.field] = option.value if option.parse is None else getattr(args, option.dest)
    return fields


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def run(args: argparse.Namespace) -> int:
    return run_claimed(args, _run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moefy import dist
    from moefy.cli.show import console, esc, status
    from moefy.data.text import load_text
    from moefy.eval.perplexity import perplexity
    from moefy.models.load import is_causal_lm, load_model
    from moefy.sparsify import (
        check_calibration_text,
        check_method,
        config_from_dict,
        measure,
        measured_sparsity,
        reset_counters,
        save_sparse,
        sparsify_,
    )

    config = config_from_dict(_config_fields(args))
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
        check_method(model, config)
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
    _print_measured(args, config, measured, dense, sparse)
    summary = {
        "method": config.method,
        "target_sparsity": config.sparsity,
        "measured_weight_sparsity": measured.total,
        "measured_activation_sparsity": measured.activation_sparsity,
        "perplexity_dense": dense.perplexity if dense else None,
        "perplexity_sparse": sparse.perplexity if sparse else None,
        "calibration_seconds": report.seconds,
    }
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


def _print_measured(args: argparse.Namespace, config, measured, dense, sparse) -> None:
    """The per-block table, the share of weights skipped and the perplexities."""
    from moefy.cli.show import console, print_table

    print_table(
        f"{config.method} at target {config.sparsity:.0%}: measured on {measured.n_tokens} tokens "
        f"of {args.data} evaluation text",
        measured.table_rows(),
    )
    console().print(
        f"weights skipped: [bold]{measured.total:.1%}[/bold] of the targeted weight reads "
        f"(zero activations {measured.activation_sparsity:.1%})"
    )
    if dense and sparse:
        console().print(
            f"perplexity: dense {dense.perplexity:.3f} -> sparse {sparse.perplexity:.3f} "
            f"(x{sparse.perplexity / dense.perplexity:.3f})"
        )
