"""One JSON round trip for every config dataclass, with a format version and one-line errors.

Every config of moefy (``MoEfyConfig``, ``RouterConfig``, ``ProfileConfig``, ``FinetuneConfig``,
``EvalConfig``, ``DropConfig``, ``SweepConfig``, ...) inherits :class:`JsonConfig`: ``to_dict``
gives JSON-ready values (tuples become lists, nested configs dicts), ``from_dict`` reads them
back (lists become tuples where the field is a tuple, dicts become nested configs), and
``check_version`` refuses a version newer than the class's ``VERSION``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from moefy.errors import MoefyError
from moefy.validate import check_version, is_number

__all__ = ["JsonConfig", "is_number", "loads_json", "read_json"]

C = TypeVar("C", bound="JsonConfig")


class JsonConfig:
    """``to_dict`` / ``from_dict`` / ``to_json`` / ``from_json`` for a config dataclass.

    A subclass is a frozen dataclass with a ``version`` field; it sets ``VERSION`` (the version
    it writes) and calls :meth:`check_version` in ``__post_init__``. Unknown keys are an error.

    Example:
        >>> @dataclass(frozen=True)
        ... class MyConfig(JsonConfig):
        ...     steps: int = 10
        ...     sizes: tuple[int, ...] = (1, 2)
        >>> MyConfig.from_json(MyConfig(steps=3).to_json())
        MyConfig(steps=3, sizes=(1, 2))
    """

    VERSION: ClassVar[int] = 1

    def check_version(self) -> None:
        """Refuse a ``version`` this moefy cannot read (not an integer in ``[1, VERSION]``)."""
        check_version(type(self).__name__, getattr(self, "version", self.VERSION), self.VERSION)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict."""
        return {
            f.name: _json_ready(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        }

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Rebuild a config from :meth:`to_dict` output."""
        name = cls.__name__
        if not isinstance(data, dict):
            raise MoefyError(f"{name}.from_dict needs a dict, got {type(data).__name__}")
        hints = _field_types(cls)
        unknown = sorted(set(data) - set(hints))
        if unknown:
            raise MoefyError(f"{name}: unknown fields {unknown}; known: {sorted(hints)}")
        return cls(**{k: _from_json(hints[k], v) for k, v in data.items()})

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


def _json_ready(value: Any) -> Any:
    if isinstance(value, JsonConfig):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return value


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> its resolved type (``Any`` where an annotation cannot be resolved)."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _from_json(kind: Any, value: Any) -> Any:
    """``value`` read from JSON, turned back into the field type ``kind`` where JSON lost it."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        return _from_json(options[0], value) if len(options) == 1 else value
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(kind)
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else Any
        return tuple(_from_json(item, v) for v in value)
    if origin is dict and isinstance(value, dict):
        item = typing.get_args(kind)[1] if typing.get_args(kind) else Any
        return {k: _from_json(item, v) for k, v in value.items()}
    if isinstance(kind, type) and issubclass(kind, JsonConfig) and isinstance(value, dict):
        return kind.from_dict(value)
    return value


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


def read_json(path: os.PathLike, what: str, after: str = "") -> Any:
    """The JSON document in the file ``path``; when it is not UTF-8 JSON, a one-line
    :class:`MoefyError` ``"<what> (<the parser's words>)<after>"``.

    Args:
        path: the file (the caller checks that it is one).
        what: the start of the error (``"runs/x.json is corrupt"``).
        after: the end of the error, what to do (``": save the model again"``).

    Returns:
        The parsed document.

    Example:
        >>> read_json(folder / "moefy_config.json", f"{folder} is corrupt", ": save it again")
        {'format': 'moefy-moe', ...}
    """
    try:
        return loads_json(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoefyError(f"{what} ({err}){after}") from None
