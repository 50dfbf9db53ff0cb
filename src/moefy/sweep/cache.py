"""The sweep cache: one JSON file per evaluated (method, level), keyed by everything it depends on.

A rerun of the same sweep finds each file and does no work; changing the evaluation config, the
model, the calibration text or a model folder (its files' sizes and times) changes the key, so
stale results are never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from moefy.errors import MoefyError
from moefy.io import write_json
from moefy.jsonconfig import loads_json

CACHE_DIR = "cache"
KEY_CHARS = 16


def folder_stamp(path: str | os.PathLike | None) -> list[Any] | None:
    """Names, sizes and modification times of a folder's files (what identifies its content)."""
    if path is None:
        return None
    folder = Path(path)
    if not folder.is_dir():
        return [str(path)]  # a model name such as smollm2-135m
    return [
        [p.name, p.stat().st_size, int(p.stat().st_mtime)]
        for p in sorted(folder.iterdir())
        if p.is_file()
    ]


def cache_key(parts: dict[str, Any]) -> str:
    """A short stable hash of JSON-able ``parts``."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_CHARS]


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


class SweepCache:
    """Cached rows of one sweep folder.

    Example:
        >>> cache = SweepCache("runs/sweep")
        >>> cache.get("teal", 0.5, key) or cache.put("teal", 0.5, key, record)
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder) / CACHE_DIR

    def path(self, method: str, level: float | None, key: str) -> Path:
        level_text = "none" if level is None else f"{level:g}"
        return self.folder / f"{_safe(method)}-{_safe(level_text)}-{key}.json"

    def get(self, method: str, level: float | None, key: str) -> dict[str, Any] | None:
        """The cached record, or None."""
        path = self.path(method, level, key)
        if not path.is_file():
            return None
        try:
            record = loads_json(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None  # a damaged entry is recomputed
        return record if isinstance(record, dict) and "row" in record else None

    def put(self, method: str, level: float | None, key: str, record: dict[str, Any]) -> None:
        """Store ``record`` (it must hold a ``row``) atomically."""
        if "row" not in record:
            raise MoefyError("a sweep cache record needs a 'row'")
        write_json(self.path(method, level, key), record)
