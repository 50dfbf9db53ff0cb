"""A mixin that gives frozen config dataclasses their JSON round trip with one-line errors."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

from moefy.errors import MoefyError

C = TypeVar("C", bound="JsonConfig")


class JsonConfig:
    """``to_dict`` / ``from_dict`` / ``to_json`` / ``from_json`` for a config dataclass.

    Tuples come back as tuples (JSON has only lists); unknown keys are an error.

    Example:
        >>> @dataclass(frozen=True)
        ... class MyConfig(JsonConfig):
        ...     steps: int = 10
        >>> MyConfig.from_json(MyConfig(steps=3).to_json())
        MyConfig(steps=3)
    """

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Rebuild a config from :meth:`to_dict` output."""
        name = cls.__name__
        if not isinstance(data, dict):
            raise MoefyError(f"{name}.from_dict needs a dict, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise MoefyError(f"{name}: unknown field(s) {unknown}; known: {sorted(fields)}")
        values = {
            k: tuple(v) if isinstance(v, list) and "tuple" in str(fields[k].type) else v
            for k, v in data.items()
        }
        return cls(**values)

    def to_json(self) -> str:
        """The config as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        """Rebuild a config from :meth:`to_json` output."""
        try:
            data = loads_json(text)
        except json.JSONDecodeError as err:
            raise MoefyError(f"{cls.__name__}: not valid JSON ({err})") from None
        return cls.from_dict(data)


def loads_json(text: str | bytes) -> Any:
    """``json.loads`` for text from a user's file: a document nested too deeply for Python's
    parser (a ``RecursionError`` there) raises ``json.JSONDecodeError`` like any other bad JSON,
    so every reader's one-line error covers it.

    Example:
        >>> loads_json("[" * 100_000 + "]" * 100_000)
        Traceback (most recent call last):
        json.decoder.JSONDecodeError: nested too deeply to read: line 1 column 1 (char 0)
    """
    try:
        return json.loads(text)
    except RecursionError:
        document = text if isinstance(text, str) else ""
        raise json.JSONDecodeError("nested too deeply to read", document, 0) from None


def is_number(value: object) -> bool:
    """Whether a JSON or argument value is a number (``True`` and ``False`` are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
