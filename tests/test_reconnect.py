"""ReconnectingSession (client/reconnect.py) over the in-process server: it follows the event
stream, waits as the back-off says (an injected sleep records it), and catches up on login."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kluis.client.backoff import BackoffPolicy
from kluis.client.events import ConnectionDown, ConnectionUp, Event, MessageReceived
from kluis.client.reconnect import ReconnectingSession
from kluis.client.transport import MemoryTransport, Transport
from kluis.errors import LocalProtocolError, TransportError
from kluis.server.inprocess import InProcessServer
from tests.kluis_testing import open_profile, register


class Switch:
    """Refuses the next ``refuse`` connections, then joins the in-process server."""

    def __init__(self, server: InProcessServer) -> None:
        self.server = server
        self.refuse = 0
        self.dialled: list[str] = []

    def factory(self, url: str) -> Transport:
        self.dialled.append(url)
        if self.refuse:
            self.refuse -= 1
            return _Refused(self.server, url)
        return MemoryTransport(self.server, url)


class _Refused(MemoryTransport):
    async def connect(self, timeout: float | None = None) -> bytes:
        raise TransportError("connection refused")


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


async def test_a_dropped_session_backs_off_reconnects_and_catches_up(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    await bob.close()
    bob = open_profile(inproc, tmp_path / "bob")
    switch, sleeps, events = Switch(inproc), Sleeps(), list[Event]()
    session = ReconnectingSession(
        bob,
        BackoffPolicy(base_s=1.0, cap_s=60.0, stable_after_s=10.0),
        transport_factory=switch.factory,
        on_event=events.append,
        clock=lambda: 0.0,  # no time passes: the connection never counts as stable
        random=lambda: 0.5,
        sleep=sleeps,
    )
    session.start()
    try:
        await session.wait_connected(5)
        await alice.send(bob.account_id, "one")
        switch.refuse = 2  # the server is down for the next two attempts
        await bob.disconnect()  # the connection drops
        await alice.send(bob.account_id, "two")  # stored meanwhile
        await session.wait_connected(5)
        for _ in range(100):
            got = [e.message.text for e in events if isinstance(e, MessageReceived)]
            if len(got) == 2:
                break
            await asyncio.sleep(0.01)
        assert got == ["one", "two"]  # "two" came with the backlog of the new login
        # The drop, then two refused attempts: 0.5, 1 and 2 seconds (random() = 0.5).
        assert sleeps.delays == [0.5, 1.0, 2.0]
        assert [type(e) for e in events if isinstance(e, ConnectionUp | ConnectionDown)] == [
            ConnectionUp,
            ConnectionDown,
            ConnectionDown,
            ConnectionDown,
            ConnectionUp,
        ]
        assert session.connections == 2 and len(session.outages) == 1
        assert switch.dialled == [bob.core.server] * 4  # no endpoints: the profile's URL
        # An operation runs once connected, and its result comes back.
        sent = await session.call(lambda c: c.send(alice.account_id, "three"))
        assert sent.text == "three"
    finally:
        await session.stop()
        await alice.close()
        await bob.close()


async def test_endpoints_rotate_on_every_drop(inproc: InProcessServer, tmp_path: Path) -> None:
    bob = await register(inproc, tmp_path / "bob")
    await bob.disconnect()
    switch, sleeps = Switch(inproc), Sleeps()
    urls = ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]
    switch.refuse = 2
    session = ReconnectingSession(
        bob,
        transport_factory=switch.factory,
        endpoints=urls,
        random=lambda: 0.0,
        sleep=sleeps,
    )
    session.start()
    try:
        await session.wait_connected(5)
        assert switch.dialled == urls  # two refused, the third node took it
        assert session.url == urls[2]
    finally:
        await session.stop()
        await bob.close()


async def test_an_error_retrying_cannot_mend_ends_the_session(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    bob = await register(inproc, tmp_path / "bob")
    await bob.disconnect()

    def broken(url: str) -> Transport:
        raise LocalProtocolError("a bad URL")

    session = ReconnectingSession(bob, transport_factory=broken, sleep=Sleeps())
    session.start()
    await asyncio.sleep(0.05)  # run() gives up at the first attempt
    with pytest.raises(LocalProtocolError):
        await session.stop()
    with pytest.raises(TransportError, match="not connected within"):
        await session.wait_connected(0.05)
    await bob.close()
