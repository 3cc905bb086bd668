"""Delivery (server/delivery, server/connection.py): the store is the truth, announcements on
the bus are hints; a connection re-reads its mailbox whenever one is out of step."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kluis.protocol import frames as f
from kluis.server.app import Server, open_server
from kluis.server.config import ServerConfig
from kluis.server.connection import Connection, State
from kluis.server.delivery.memory import InProcessBus


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    opened = open_server(ServerConfig(data_dir=tmp_path / "data"))
    yield opened
    await opened.store.close()


def logged_in(server: Server, device: str) -> Connection:
    """A connection as a login leaves it (the signatures are tested elsewhere)."""
    conn = Connection(server.services, lambda: None)
    conn.state, conn.device_id = State.AUTHENTICATED, device
    server.services.bus.subscribe(device, conn)
    conn.backlog = True
    return conn


async def drain(conn: Connection) -> list[tuple[int, bytes]]:
    """What the transport would write, page by page, until the connection is in step."""
    out: list[tuple[int, bytes]] = []
    while True:
        for data in conn.take_outgoing():
            frame = f.decode_server_frame(data)
            if isinstance(frame, f.Deliver):
                out.extend((e.id, e.body) for e in frame.envelopes)
        while conn.reading:
            await asyncio.sleep(0.001)
        if not conn.backlog and not conn.reading:
            for data in conn.take_outgoing():
                frame = f.decode_server_frame(data)
                if isinstance(frame, f.Deliver):
                    out.extend((e.id, e.body) for e in frame.envelopes)
            return out


async def test_the_first_envelope_after_an_empty_backlog_is_read_from_the_store(
    server: Server,
) -> None:
    conn = logged_in(server, "d")
    assert await drain(conn) == []
    (first,) = await server.services.mailbox.deposit([("d", b"one")])
    assert conn.backlog  # the connection does not know the numbers yet: it reads
    assert await drain(conn) == [(first, b"one")]
    # In step now: the next one is taken from the announcement, without a read.
    (second,) = await server.services.mailbox.deposit([("d", b"two")])
    assert not conn.backlog and not conn.reading
    assert await drain(conn) == [(second, b"two")]


async def test_an_envelope_committed_during_a_read_is_read_again(server: Server) -> None:
    conn = logged_in(server, "d")
    conn.take_outgoing()  # starts the backlog's read
    assert conn.reading
    (first,) = await server.services.mailbox.deposit([("d", b"one")])  # may land after it
    assert await drain(conn) == [(first, b"one")]
    assert not conn.backlog


async def test_a_gap_sends_the_connection_back_to_the_store(server: Server) -> None:
    conn = logged_in(server, "d")
    await drain(conn)
    (first,) = await server.services.mailbox.deposit([("d", b"one")])
    await drain(conn)
    conn.envelope(first + 2, b"three")  # one was missed (another node, a dropped signal)
    assert conn.backlog
    conn.envelope(first + 5, None)  # a signal without its body changes nothing more
    assert conn.backlog


def test_the_newest_subscriber_wins_and_revocation_reaches_it() -> None:
    class Sub:
        def __init__(self) -> None:
            self.events: list[str] = []

        def envelope(self, seq: int, body: bytes | None) -> None:
            self.events.append(f"envelope {seq}")

        def keys_low(self, count: int) -> None:
            self.events.append(f"keys {count}")

        def displaced(self) -> None:
            self.events.append("displaced")

        def revoked(self) -> None:
            self.events.append("revoked")

    bus = InProcessBus()
    old, new = Sub(), Sub()
    bus.subscribe("d", old)
    bus.announce("d", 1, b"x")
    bus.subscribe("d", new)
    bus.unsubscribe("d", old)  # the old connection closing does not remove the new one
    bus.announce("d", 2)
    bus.keys_low("d", 3)
    bus.revoke("d")
    bus.announce("other", 1)
    assert old.events == ["envelope 1", "displaced"]
    assert new.events == ["envelope 2", "keys 3", "revoked"]
