"""Argument types and the options that several subcommands share."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


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
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


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
    parser.add_argument("--block-len", type=positive_int, default=256, help="tokens per block")
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, help="blocks per forward pass"
    )
