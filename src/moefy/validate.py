"""Checks shared by every config's ``__post_init__``: one test and one wording per mistake.

Each check takes the field's full name (``"RouterConfig.epochs"``), so the message names it the
way the user wrote it, and raises :class:`moefy.errors.MoefyError` with a one-line message.

Example:
    >>> check_int("RouterConfig.epochs", 0, minimum=1)
    Traceback (most recent call last):
    moefy.errors.MoefyError: RouterConfig.epochs must be an integer >= 1, got 0
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

from moefy.errors import MoefyError


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer (``True`` and ``False`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """Whether ``value`` is a real number (``True`` and ``False`` are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value: object) -> bool:
    """Whether ``value`` is a real, finite number (not a bool, nan or inf)."""
    return is_number(value) and math.isfinite(value)


def check_int(name: str, value: object, *, minimum: int | None = None) -> None:
    """``value`` is an integer, at least ``minimum`` when one is given.

    Args:
        name: the field, as the message shows it.
        value: what was given.
        minimum: the smallest allowed value, or None for any integer.
    """
    if not is_int(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise MoefyError(f"{name} must be an integer{bound}, got {value!r}")


def check_number(
    name: str,
    value: object,
    *,
    above: float | None = None,
    minimum: float | None = None,
    below: float | None = None,
    maximum: float | None = None,
) -> None:
    """``value`` is a finite number within the bounds given (``above``/``below`` exclusive,
    ``minimum``/``maximum`` inclusive).

    Example:
        >>> check_number("RouterConfig.lr", 0.0, above=0.0)
        Traceback (most recent call last):
        moefy.errors.MoefyError: RouterConfig.lr must be a number > 0, got 0.0
    """
    bounds = [
        (above, ">", lambda v, b: v > b),
        (minimum, ">=", lambda v, b: v >= b),
        (below, "<", lambda v, b: v < b),
        (maximum, "<=", lambda v, b: v <= b),
    ]
    given = [(bound, sign, holds) for bound, sign, holds in bounds if bound is not None]
    if not is_finite(value) or not all(holds(value, bound) for bound, _, holds in given):
        wanted = " and ".join(f"{sign} {bound:g}" for bound, sign, _ in given)
        raise MoefyError(f"{name} must be a number{' ' + wanted if wanted else ''}, got {value!r}")


def check_fraction(name: str, value: object, *, zero: bool = True, one: bool = False) -> None:
    """``value`` is a number in the unit interval: ``[0, 1)`` by default; ``zero`` and ``one``
    say whether each end is allowed.

    Example:
        >>> check_fraction("sparsity", 1.0)
        Traceback (most recent call last):
        moefy.errors.MoefyError: sparsity must be a number in [0, 1), got 1.0
    """
    ok = is_finite(value) and (value >= 0.0 if zero else value > 0.0)
    ok = ok and (value <= 1.0 if one else value < 1.0)
    if not ok:
        interval = f"{'[' if zero else '('}0, 1{']' if one else ')'}"
        raise MoefyError(f"{name} must be a number in {interval}, got {value!r}")


def check_bool(name: str, value: object) -> None:
    """``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise MoefyError(f"{name} must be True or False, got {value!r}")


def check_choice(name: str, value: object, choices: Iterable[str]) -> None:
    """``value`` is one of ``choices``."""
    known = list(choices)
    if value not in known:
        raise MoefyError(f"{name} must be one of {', '.join(known)}, got {value!r}")


def check_version(name: str, version: object, current: int) -> None:
    """A config or file format ``version`` this moefy reads: an integer in ``[1, current]``.

    Args:
        name: what carries the version (``"RouterConfig"``).
        version: the version found.
        current: the newest version this moefy writes.
    """
    if not is_int(version) or not 1 <= version <= current:
        raise MoefyError(
            f"{name} version {version!r} is not supported (this moefy reads versions up to "
            f"{current}): upgrade moefy, or write the config again"
        )


def keep_or_fraction(keep: Any, fraction: Any, *, where: str, old: str = "fraction") -> Any:
    """The ``keep`` budget of a call that took ``fraction`` before: ``fraction`` still works,
    with a :class:`DeprecationWarning` that says to use ``keep=``; both at once is an error.

    Args:
        keep: the value given as ``keep=`` (None when not given).
        fraction: the value given under the old name (None when not given).
        where: the function, for messages (``"set_routing"``).
        old: the old keyword's name.

    Returns:
        ``keep``, or ``fraction`` when only that was given.

    Example:
        >>> keep_or_fraction(None, 0.25, where="set_routing")  # warns: use keep=
        0.25
    """
    if fraction is None:
        return keep
    if keep is not None:
        raise MoefyError(f"{where}: give keep= only ({old}= is its former name), not both")
    warnings.warn(
        f"{where}({old}=...) is deprecated: use keep= (the share of experts kept per token)",
        DeprecationWarning,
        stacklevel=3,
    )
    return fraction
