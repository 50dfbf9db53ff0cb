"""The shared option helpers of moefy.cli.args: number types and --eval-tokens."""

from __future__ import annotations

import argparse
import math
import re

import pytest

from moefy.cli.args import add_eval_tokens, float_type, open_unit_float, positive_float

FLOAT_CASES = [
    # (type, text, the value or the usage error)
    (positive_float, "2.5", 2.5),
    (positive_float, "0", "must be > 0, got 0.0"),
    (positive_float, "nan", "expected a finite number, got 'nan'"),
    (positive_float, "x", "expected a number, got 'x'"),
    (open_unit_float, "1", "must be between 0 and 1 (exclusive), got 1.0"),
    (float_type("finite", math.isfinite, finite=False), "inf", "must be finite, got inf"),
]


@pytest.mark.parametrize(("parse", "text", "expected"), FLOAT_CASES)
def test_float_types(parse, text, expected):
    if isinstance(expected, float):
        assert parse(text) == expected
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=f"^{re.escape(expected)}$"):
            parse(text)


@pytest.mark.parametrize(("may_skip", "zero_ok"), [(False, False), (True, True)])
def test_eval_tokens_option(may_skip, zero_ok):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_eval_tokens(parser, "tokens to evaluate", default=4096, may_skip=may_skip)
    assert parser.parse_args([]).eval_tokens == 4096
    if zero_ok:
        assert parser.parse_args(["--eval-tokens", "0"]).eval_tokens == 0
    else:
        with pytest.raises(argparse.ArgumentError):
            parser.parse_args(["--eval-tokens", "0"])
