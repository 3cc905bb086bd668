"""A scratch PostgreSQL database per test: created with a random name, dropped afterwards.

The server is ``KLUIS_TEST_POSTGRES`` (default: the CI's, trust auth on loopback). When it does
not answer, the test is skipped with the reason; any other failure is an error.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import pytest

ADMIN_URL = os.environ.get("KLUIS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _run(sql: str) -> None:
    # The fixtures are synchronous (they may run beside a test's event loop, never inside it).
    asyncio.run(_admin(sql))


def database_url(name: str) -> str:
    base, _, _ = ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


@contextmanager
def scratch_database() -> Iterator[str]:
    """The URL of a new, empty database, dropped (connections and all) when the block ends."""
    name = f"kluis_test_{secrets.token_hex(8)}"
    try:
        _run(f'CREATE DATABASE "{name}"')
    except (TimeoutError, OSError) as exc:
        pytest.skip(f"PostgreSQL is not reachable at {ADMIN_URL}: {exc}")
    try:
        yield database_url(name)
    finally:
        _run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
