"""Two real ``kluis serve --database postgresql://... --redis redis://...`` nodes on one store:
a message sent by a client of node one reaches, at once, a client connected to node two (the
signal crosses Redis; the envelope comes from PostgreSQL)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_postgres_server import PostgresServerProcess
from tests.kluis_testing import register
from tests.postgres import scratch_database
from tests.redis_testing import drop_prefix
from tests.test_delivery_redis import REDIS_URL, _redis_reachable


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[PostgresServerProcess, PostgresServerProcess]]:
    reason = asyncio.run(_redis_reachable())
    if reason is not None:
        pytest.skip(reason)
    prefix = f"kluis-test-{secrets.token_hex(6)}"
    with scratch_database() as url:
        nodes = [PostgresServerProcess(tmp_path / name, url) for name in ("node-one", "node-two")]
        for node in nodes:
            node.extra_args += ["--redis", REDIS_URL, "--redis-prefix", prefix]
        try:
            for node in nodes:
                node.start()
            yield nodes[0], nodes[1]
        finally:
            for node in nodes:
                node.stop()
            drop_prefix(REDIS_URL, prefix)


async def test_a_message_sent_on_one_node_reaches_a_client_on_another_at_once(
    two_nodes: tuple[PostgresServerProcess, PostgresServerProcess], tmp_path: Path
) -> None:
    one, two = two_nodes
    alice = await register(one, tmp_path / "alice")
    bob = await register(two, tmp_path / "bob")
    try:
        assert await bob.receive() == []  # in step: nothing waiting
        await alice.send(bob.account_id, "across nodes")
        # No reconnect, no poll: only the bus tells node two's connection to read.
        assert [m.text for m in await bob.receive(wait=3, until=1)] == ["across nodes"]
        await bob.send(alice.account_id, "and back")
        assert [m.text for m in await alice.receive(wait=3, until=1)] == ["and back"]
    finally:
        await alice.close()
        await bob.close()
