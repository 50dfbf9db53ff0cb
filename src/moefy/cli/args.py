"""Argument types and the options that several subcommands share."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (0 usually means "skip")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


MIN_BLOCK_LEN = 2  # a block of one token has no next token to predict


def block_len(text: str) -> int:
    """argparse type for --block-len: an integer >= 2."""
    value = positive_int(text)
    if value < MIN_BLOCK_LEN:
        raise argparse.ArgumentTypeError(f"must be >= {MIN_BLOCK_LEN}, got {value}")
    return value


def _number(text: str) -> float:
    """A finite float: nan and inf are refused here, so no option can take them."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def open_unit_float(text: str) -> float:
    """argparse type: a float strictly between 0 and 1."""
    value = _number(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return value


def float_list(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated floats, e.g. ``0.5,0.25``."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not all(math.isfinite(value) for value in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def add_model_and_data(parser: argparse.ArgumentParser, *, tokens: int) -> None:
    """--model, --data, --tokens, --block-len, --batch-size."""
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="built-in name (smollm2-135m, minilm-l6) or a local Hugging Face folder",
    )
    parser.add_argument(
        "--data",
        default="bbc-news",
        help="built-in text (bbc-news, shakespeare, kjv, tweets) or a .txt/.jsonl file or folder",
    )
    parser.add_argument("--tokens", type=positive_int, default=tokens, help="tokens of text to use")
    parser.add_argument("--block-len", type=block_len, default=256, help="tokens per block (>= 2)")
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, help="blocks per forward pass"
    )


# Spelled out so that --help does not import torch; moefy.device holds the same names.
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


def device_spec(text: str) -> str:
    """argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (checked against the machine
    later, by :func:`moefy.device.resolve_device`)."""
    spec = text.strip().lower()
    kind, sep, index = spec.partition(":")
    if kind not in DEVICE_CHOICES or (sep and (kind != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(DEVICE_CHOICES)} (or cuda:N), got {text!r}"
        )
    return spec


def add_device_and_dtype(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype: where the model runs and the dtype of its weights.

    The defaults are ``auto``: a CUDA GPU in bf16 where torch sees one, else the CPU in fp32
    (what moefy did before these flags). Read them back with :func:`device_and_dtype`.
    """
    parser.add_argument(
        "--device",
        type=device_spec,
        default="auto",
        metavar="{auto,cpu,cuda}",
        help="where the model runs: auto (default: CUDA when present, else CPU), cpu or cuda[:N]",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="dtype of the weights: auto (bf16 on CUDA, fp32 on the CPU), fp32, bf16 or fp16; "
        "statistics are accumulated in fp32 whatever it is",
    )


def device_and_dtype(args: argparse.Namespace):
    """The ``(torch.device, torch.dtype)`` of ``--device`` and ``--dtype``.

    Raises:
        MoefyError: CUDA asked for where torch sees no GPU (the CLI prints one line, exit 2).
    """
    from moefy.device import resolve

    return resolve(args.device, args.dtype)


RESULTS_HELP = (
    "JSON results file to add the rows to (created if missing; an existing file must be a moefy "
    "results list, a folder or anything else there is refused)"
)
OUTPUT_POLICY = (
    "a new path is created; an existing output that moefy wrote is replaced only with "
    "--overwrite; a file or folder moefy did not write, a device or a link is never replaced"
)


def add_output(
    parser: argparse.ArgumentParser,
    help_text: str,
    *,
    default: str | None,
    option: str = "--out",
    resume: bool = False,
) -> None:
    """The output option (``--out`` or ``--results``) and ``--overwrite``, with the output
    policy of :mod:`moefy.io` in their help."""
    parser.add_argument(option, default=default, help=f"{help_text} ({OUTPUT_POLICY})")
    if any("--overwrite" in action.option_strings for action in parser._actions):
        return  # a command with two outputs shares one --overwrite
    also = "; without it an existing folder is resumed" if resume else ""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace an existing output that moefy wrote before{also}",
    )


def claimed_output(
    args: argparse.Namespace,
    kind: str,
    *,
    option: str = "--out",
    resume: bool = False,
    overwrite: bool | None = None,
):
    """Check ``args``' output before any work and hold its lock for the run (a context manager
    yielding the path; None when the option was not given).

    On a distributed run every process checks; the process of rank 0 (the writer) locks.
    """
    import contextlib

    from moefy.io import claim_output

    path = getattr(args, option.removeprefix("--").replace("-", "_"))
    if path is None:
        return contextlib.nullcontext(None)
    return claim_output(
        path,
        kind,  # type: ignore[arg-type]
        overwrite=args.overwrite if overwrite is None else overwrite,
        resume=resume,
        option=option,
        writer=is_writer(),
    )


def is_writer() -> bool:
    """Whether this process writes outputs: rank 0 of a torchrun launch (read from ``RANK``,
    since commands claim their outputs before the process group exists), or a lone process."""
    import os

    return os.environ.get("RANK", "0") == "0"
