"""The in-memory transport: a client and a server application in one process, no socket."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kluis.client.transport import MemoryTransport, WebSocketTransport
from kluis.errors import TransportError, UnknownDevice
from kluis.protocol import frames as f
from kluis.server.inprocess import InProcessServer
from tests.kluis_testing import link_device, open_profile, register


@pytest.fixture
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every way a test could open a socket raises (and is recorded) while the test runs."""
    attempts: list[str] = []

    def refuse(what: str) -> Any:
        def refused(*args: object, **kwargs: object) -> Any:
            attempts.append(what)
            raise OSError(f"no sockets in this test ({what})")

        return refused

    class NoSocket(socket.socket):
        def __init__(self, *args: object, **kwargs: object) -> None:
            refuse("socket.socket")()

    monkeypatch.setattr(socket, "socket", NoSocket)
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket, "socketpair", refuse("socket.socketpair"))
    loop_type = type(asyncio.get_event_loop_policy().get_event_loop())
    for name in ("create_connection", "create_server", "create_unix_connection", "sock_connect"):
        if hasattr(loop_type, name):
            monkeypatch.setattr(loop_type, name, refuse(f"loop.{name}"))
    yield attempts


async def test_whole_one_to_one_flow_in_one_process_without_a_socket(
    inproc: InProcessServer, tmp_path: Path, no_sockets: list[str]
) -> None:
    # The guard works: the WebSocket transport cannot get out.
    with pytest.raises(TransportError):
        await WebSocketTransport(inproc.url).connect()
    assert no_sockets
    no_sockets.clear()

    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    alice2 = await link_device(alice, inproc, tmp_path / "alice2")
    assert isinstance(alice._transport, MemoryTransport)
    assert len(await alice.devices()) == 2

    await alice.send(bob.account_id, "hello bob")
    got = await bob.receive(wait=5, until=1)
    assert [(m.sender, m.text) for m in got] == [(alice.account_id, "hello bob")]
    await bob.send(alice.account_id, "hi alice")
    assert [m.text for m in await alice.receive(wait=5, until=1)] == ["hi alice"]
    # The second device gets its own account's sent copy and Bob's answer.
    assert [m.text for m in await alice2.receive(wait=5, until=2)] == ["hello bob", "hi alice"]
    await alice2.send(bob.account_id, "from my laptop")
    assert [m.text for m in await bob.receive(wait=5, until=1)] == ["from my laptop"]
    assert [m.text for m in await alice.receive(wait=5, until=1)] == ["from my laptop"]

    # Revocation: the revoked device's connection is closed and it cannot log in again.
    await alice.revoke(alice2.core.device_id)
    assert len(await alice.devices()) == 1
    with pytest.raises(TransportError):
        await alice2.receive(wait=5)
    await alice2.close()
    again = open_profile(inproc, tmp_path / "alice2")
    with pytest.raises(UnknownDevice):
        await again.connect()
    await again.close()
    await bob.send(alice.account_id, "after")
    assert [m.text for m in await alice.receive(wait=5, until=1)] == ["after"]
    for c in (alice, bob):
        assert c.errors == []
        await c.close()
    assert no_sockets == []


async def test_a_newer_connection_displaces_the_older(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    bob = await register(inproc, tmp_path / "bob")
    await bob.close()
    first = open_profile(inproc, tmp_path / "bob")
    await first.connect()
    second = open_profile(inproc, tmp_path / "bob")
    await second.connect()
    pushes = []
    while (push := await asyncio.wait_for(first.transport.pushes.get(), 5)) is not None:
        pushes.append(push)
    with pytest.raises(TransportError) as info:
        await first.transport.request(lambda rid: f.ListDevices(rid=rid, account="x"), f.Devices)
    assert "not connected" in str(info.value)
    await first.close()
    assert len(await second.devices()) == 1  # closing the old one left the new one hooked up
    await second.close()


async def test_failed_login_closes_after_the_answer(inproc: InProcessServer) -> None:
    transport = MemoryTransport(inproc, inproc.url)
    await transport.connect()
    with pytest.raises(UnknownDevice):
        await transport.request(lambda rid: f.Auth(rid=rid, device="A" * 43, sig="x"), f.Welcome)
    assert await asyncio.wait_for(transport.pushes.get(), 5) is None  # then the close
    await transport.close()


async def test_server_close_ends_clients_and_refuses_new_ones(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    await inproc.close()
    with pytest.raises(TransportError):
        await alice.receive(wait=5)
    await alice.close()
    with pytest.raises(TransportError):
        await MemoryTransport(inproc, inproc.url).connect()
