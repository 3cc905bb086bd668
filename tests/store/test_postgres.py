"""What only the PostgreSQL store has: versioned migrations, a connection failure's message."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from kluis.server.store.postgres import MIGRATIONS, PostgresStore
from tests.postgres import scratch_database


@pytest.fixture
def url() -> Iterator[str]:
    with scratch_database() as found:
        yield found


async def versions(url: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        return [int(r[0]) for r in await conn.fetch("SELECT version FROM schema_version")]
    finally:
        await conn.close()


async def test_migrations_run_once_even_when_nodes_start_together(url: str, tmp_path: Path) -> None:
    stores = [PostgresStore(url, key_file=tmp_path / "storage.key") for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))  # one migrates, the others wait and see
    await asyncio.gather(*(s.close() for s in stores))
    assert await versions(url) == [v for v, _ in MIGRATIONS]
    again = PostgresStore(url, key_file=tmp_path / "storage.key")
    await again.open()
    await again.close()
    assert await versions(url) == [v for v, _ in MIGRATIONS]


async def test_an_unreachable_database_is_a_connection_error_without_the_password() -> None:
    store = PostgresStore("postgresql://kluis:hunter2@127.0.0.1:1/none")
    with pytest.raises(ConnectionError) as caught:
        await store.count_links(0)
    assert "hunter2" not in str(caught.value)
    await store.close()


def test_the_store_names_only_its_key_file(tmp_path: Path) -> None:
    assert PostgresStore("postgresql://127.0.0.1/x").footprint() == []
    key_file = tmp_path / "storage.key"
    assert PostgresStore("postgresql://127.0.0.1/x", key_file=key_file).footprint() == [key_file]
