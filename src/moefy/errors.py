"""User-facing errors.

A :class:`MoefyError` is a mistake the user can fix (bad path, unknown architecture, k out of
range). The CLI prints its message on one line and exits with code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class MoefyError(ValueError):
    """An error caused by user input; its message says what to do."""
