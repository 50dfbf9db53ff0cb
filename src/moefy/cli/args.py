"""Argument types and the options that several subcommands share."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from moefy.sparsify.config import positive_int as _parse_positive_int


def argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a library parser: its ``ValueError`` becomes a usage error that
    shows the parser's own message (argparse would print "invalid <name> value")."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = parse.__name__
    convert.__doc__ = parse.__doc__
    return convert


# argparse type: an integer > 0 (the library's parser, as a usage error)
positive_int = argparse_type(_parse_positive_int)


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


def parse_float(text: str) -> float:
    """An option's number (nan and inf included); a usage error that quotes any other text.

    Example:
        >>> parse_float("0.5")
        0.5
    """
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _number(text: str) -> float:
    """A finite float: nan and inf are refused here, so no option can take them."""
    value = parse_float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def float_type(
    must: str, ok: Callable[[float], bool], *, finite: bool = True
) -> Callable[[str], float]:
    """An argparse type: a number for which ``ok`` holds, else the usage error
    ``must be <must>, got <value>``.

    Args:
        must: what the number must be, as the error says it (``"> 0"``).
        ok: the test.
        finite: refuse nan and inf before ``ok`` (``expected a finite number``).

    Returns:
        The type.

    Example:
        >>> speedup = float_type("a finite number >= 1", lambda v: v >= 1, finite=False)
    """

    def convert(text: str) -> float:
        value = _number(text) if finite else parse_float(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {must}, got {value}")
        return value

    convert.__doc__ = f"argparse type: a number {must}."
    return convert


positive_float = float_type("> 0", lambda value: value > 0)
non_negative_float = float_type(">= 0", lambda value: value >= 0)
open_unit_float = float_type("between 0 and 1 (exclusive)", lambda value: 0.0 < value < 1.0)


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


KEEP_OPTION = "--keep"


class _NoteSpelling(argparse.Action):
    """Store the value and which spelling of the option the user typed (``<dest>_option``),
    so that a message can name the option as it was written."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_option", option_string)


def add_keep_option(
    parser: Any,
    *,
    former: str,
    type: Callable[[str], Any],  # noqa: A002 - argparse's word for it
    default: Any,
    help: str,  # noqa: A002 - argparse's word for it
) -> None:
    """``--keep`` (dest ``keep``: the share of the FFN or of the experts kept per token) and
    its former spelling ``former``, still accepted but left out of ``--help``, on ``parser``
    (a parser or an argument group). Read back which one was typed with :func:`keep_option`.

    Example:
        >>> add_keep_option(parser, former="--fractions", type=float_list, default=(0.5,),
        ...                 help="comma-separated shares of experts kept per token")
    """
    parser.add_argument(
        KEEP_OPTION, dest="keep", type=type, default=default, help=help, action=_NoteSpelling
    )
    parser.add_argument(
        former,
        dest="keep",
        type=type,
        default=default,
        help=argparse.SUPPRESS,
        action=_NoteSpelling,
    )


def keep_option(args: argparse.Namespace) -> str:
    """The spelling of the keep option the user typed (``--keep`` unless the former one)."""
    return getattr(args, "keep_option", None) or KEEP_OPTION


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


def add_eval_tokens(
    parser: argparse.ArgumentParser, help_text: str, *, default: int, may_skip: bool = False
) -> None:
    """--eval-tokens: tokens of evaluation text (``may_skip``: 0 is allowed, and skips).

    Example:
        >>> add_eval_tokens(parser, "tokens of evaluation text for --perplexity", default=4096)
    """
    parser.add_argument(
        "--eval-tokens",
        type=non_negative_int if may_skip else positive_int,
        default=default,
        help=help_text,
    )


def run_claimed(args: argparse.Namespace, work: Callable[[argparse.Namespace], int]) -> int:
    """``work(args)`` with the output folder checked before any work and locked while it runs.

    Example:
        >>> def run(args): return run_claimed(args, _run)
    """
    with claimed_output(args, "folder"):
        return work(args)


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
