"""One name table per kind of pluggable thing (sparsify methods, split methods, routers, selection
rules, layer methods, saved formats, sweep methods).

Each package keeps one :class:`Registry` and fills it with one ``register`` call per entry, placed
beside the code it names (as peft's ``register_peft_method`` and torchao's
``register_quantize_module_handler``); every lookup table the CLI, the sweep and the report need is
read from it, so a new entry is one module and one call.

Example:
    >>> SPLITS = Registry("split method")
    >>> SPLITS.register("random", split_random, help="random equal-size experts")
    >>> SPLITS.get("random").value is split_random
    True
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from moefy.errors import MoefyError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered thing.

    Attributes:
        name: its name on the command line and in saved files.
        value: what is registered (a handler, a class, a function).
        help: one line for ``--help`` and the docs.
        meta: anything else the owner's tables need (a config class, default levels, ...).
    """

    name: str
    value: T
    help: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Names to entries, in registration order, with one-line errors for unknown names.

    Args:
        kind: what the entries are, for messages (``"sparsify method"``).
        load: called once before the first lookup, to import modules that register built-in
            entries lazily (keeps ``import moefy`` fast and breaks import cycles).
    """

    def __init__(self, kind: str, load: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._load = load

    def _loaded(self) -> dict[str, Entry[T]]:
        if self._load is not None:
            load, self._load = self._load, None
            load()
        return self._entries

    def register(
        self,
        name: str,
        value: T,
        *,
        help: str = "",  # noqa: A002 - argparse's word for it
        overwrite: bool = False,
        **meta: Any,
    ) -> T:
        """Add ``value`` under ``name``; a name already taken needs ``overwrite=True``.

        Returns ``value``, so ``register`` can close a definition.
        """
        if not isinstance(name, str) or not name or name != name.strip():
            raise MoefyError(f"a {self.kind} needs a non-empty name without spaces, got {name!r}")
        if name in self._entries and not overwrite:
            raise MoefyError(f"{self.kind} {name!r} exists already; pass overwrite=True")
        self._entries[name] = Entry(name, value, help, dict(meta))
        return value

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a toy entry remove it after)."""
        self._loaded().pop(name, None)

    def get(self, name: str) -> Entry[T]:
        """The entry called ``name``; a one-line error naming a close match and the known ones."""
        entries = self._loaded()
        entry = entries.get(name)
        if entry is None:
            close = difflib.get_close_matches(str(name), list(entries), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise MoefyError(
                f"unknown {self.kind} {name!r}{hint}; known: {', '.join(entries) or 'none'}"
            )
        return entry

    def names(self) -> list[str]:
        """Every registered name, in registration order."""
        return list(self._loaded())

    def entries(self) -> list[Entry[T]]:
        """Every entry, in registration order."""
        return list(self._loaded().values())

    def find(self, predicate: Callable[[Entry[T]], bool]) -> Entry[T] | None:
        """The first entry for which ``predicate`` holds, or None."""
        return next((e for e in self._loaded().values() if predicate(e)), None)

    def __contains__(self, name: object) -> bool:
        return name in self._loaded()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._loaded())
