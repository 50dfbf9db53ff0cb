"""User-facing errors.

A :class:`MoefyError` is a mistake the user can fix (bad path, unknown architecture, k out of
range). The CLI prints its message on one line and exits with code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class MoefyError(ValueError):
    """An error caused by user input; its message says what to do."""


def check_config(config: object, expected: type, name: str = "config") -> None:
    """Refuse a config argument of the wrong type with a one-line :class:`MoefyError`.

    A public verb calls this first, so a dict or None given for its config fails in the user's
    words instead of as an ``AttributeError`` deep inside.

    Example:
        >>> check_config({"num_experts": 4}, MoEfyConfig)
        MoefyError: config must be a MoEfyConfig, got dict
    """
    if not isinstance(config, expected):
        got = "None" if config is None else type(config).__name__
        article = "an" if expected.__name__[0] in "AEIOU" else "a"
        raise MoefyError(f"{name} must be {article} {expected.__name__}, got {got}")


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (its type's name if it has none), for
    one-line errors built from a library's multi-line ones."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
