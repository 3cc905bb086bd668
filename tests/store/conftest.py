"""The storage suite runs against every ``Store`` implementation: add one to ``IMPLEMENTATIONS``
(and to ``open_store``) and it must pass unchanged.

PostgreSQL: each test gets a database of its own with a random name on the server at
``KLUIS_TEST_POSTGRES`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``), dropped at
teardown; the tests are skipped, with the reason, only when that server does not answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from kluis.server.store.postgres import PostgresStore
from kluis.server.store.protocol import Store
from kluis.server.store.sqlite import SqliteStore
from tests.postgres import scratch_database

IMPLEMENTATIONS = ["sqlite", "postgres"]


def open_store(kind: str, where: Path | str, key_file: Path | None = None) -> Store:
    if kind == "sqlite":
        assert isinstance(where, Path)
        return SqliteStore(where / "kluis.sqlite3")
    if kind == "postgres":
        assert isinstance(where, str)
        return PostgresStore(where, key_file=key_file)
    raise AssertionError(f"unknown store {kind!r}")  # pragma: no cover


@pytest.fixture(params=IMPLEMENTATIONS)
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """Opens the same store again (a restart): each call returns a new instance. A store that
    keeps files keeps them under ``tmp_path``; a PostgreSQL store uses a fresh database."""
    kind = str(request.param)
    if kind == "postgres":
        with scratch_database() as url:
            yield lambda: open_store(kind, url, tmp_path / "storage.key")
        return
    yield lambda: open_store(kind, tmp_path)


@pytest.fixture
async def store(opener: Callable[[], Store]) -> AsyncIterator[Store]:
    opened = opener()
    yield opened
    await opened.close()
