"""The storage suite runs against every ``Store`` implementation: add one to ``IMPLEMENTATIONS``
(and to ``open_store``) and it must pass unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from kluis.server.store.protocol import Store
from kluis.server.store.sqlite import SqliteStore

IMPLEMENTATIONS = ["sqlite"]


def open_store(kind: str, tmp_path: Path) -> Store:
    if kind == "sqlite":
        return SqliteStore(tmp_path / "kluis.sqlite3")
    raise AssertionError(f"unknown store {kind!r}")  # pragma: no cover


@pytest.fixture(params=IMPLEMENTATIONS)
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """Opens the same store again (a restart): each call returns a new instance. A store that
    keeps files keeps them under ``tmp_path``."""
    kind = str(request.param)
    return lambda: open_store(kind, tmp_path)


@pytest.fixture
async def store(opener: Callable[[], Store]) -> AsyncIterator[Store]:
    opened = opener()
    yield opened
    await opened.close()
