"""Fixtures of the hostile-input suite; the machinery is in ``hostile_support.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile_cases import HELD_LOCKS
from hostile_support import Assets


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    """The session's tiny model, text and moefy outputs, each built on first use."""
    return Assets(tmp_path_factory.mktemp("hostile-assets"))


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The case's own folder, also its working directory (a default ``runs/...`` output lands
    inside it, where the disk check sees it)."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture(autouse=True)
def _no_progress_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress lines (``MOEFY_PROGRESS=lines``) would land on stderr, which the cases read."""
    monkeypatch.delenv("MOEFY_PROGRESS", raising=False)


@pytest.fixture(autouse=True)
def _release_locks():
    """Drop the output locks a case held to play a concurrent moefy run."""
    yield
    while HELD_LOCKS:
        HELD_LOCKS.pop().release()
