"""Two real clients and a third device, joined to a server application in memory."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import msgspec
import pytest

from kluis.protocol import frames as f
from kluis.server.config import Limits
from kluis.server.inprocess import InProcessServer
from tests.kluis_testing import link_device, open_profile, reconnect, register, start_inprocess


def texts(messages: list) -> list[str]:  # type: ignore[type-arg]
    return [m.text for m in messages]


async def test_two_users_and_a_second_device_both_directions(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    alice2 = await link_device(alice, inproc, tmp_path / "alice2")
    assert alice2.account_id == alice.account_id
    assert len(await alice.devices()) == 2

    await alice2.close()  # the second device is offline for a while

    await alice.send(bob.account_id, "hello bob")
    got = await bob.receive(wait=5, until=1)
    assert [(m.sender, m.text) for m in got] == [(alice.account_id, "hello bob")]

    # Bob answers: both of Alice's devices get it.
    await bob.send(alice.account_id, "hi alice")
    assert texts(await alice.receive(wait=5, until=1)) == ["hi alice"]
    # Back online, Alice's second device gets her own sent message (a sync copy) and Bob's answer.
    alice2 = await reconnect(inproc, tmp_path / "alice2")
    got2 = await alice2.receive()
    assert [(m.sender, m.text) for m in got2] == [
        (alice.account_id, "hello bob"),
        (bob.account_id, "hi alice"),
    ]

    # From the second device: Bob receives it; the first device gets the copy.
    await alice2.send(bob.account_id, "from my laptop")
    assert texts(await bob.receive(wait=5, until=1)) == ["from my laptop"]
    assert texts(await alice.receive(wait=5, until=1)) == ["from my laptop"]

    # Histories agree, oldest first.
    want = ["hello bob", "hi alice", "from my laptop"]
    assert texts(alice.history(bob.account_id)) == want
    assert texts(alice2.history(bob.account_id)) == want
    assert texts(bob.history(alice.account_id)) == want
    for c in (alice, alice2, bob):
        assert c.errors == []
        await c.close()


async def test_recipient_offline_then_online(inproc: InProcessServer, tmp_path: Path) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    bob_id = bob.account_id
    await bob.close()  # Bob goes offline

    for i in range(5):
        await alice.send(bob_id, f"while you were away {i}")

    bob = await reconnect(inproc, tmp_path / "bob")
    got = await bob.receive()
    assert texts(got) == [f"while you were away {i}" for i in range(5)]
    # Acknowledged: a new connection receives nothing more.
    await bob.close()
    bob = await reconnect(inproc, tmp_path / "bob")
    assert await bob.receive() == []
    await bob.close()
    await alice.close()


async def test_many_messages_in_a_row_keep_order(inproc: InProcessServer, tmp_path: Path) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    for i in range(30):
        await alice.send(bob.account_id, f"m{i}")
    got = await bob.receive(wait=5, until=30)
    assert texts(got) == [f"m{i}" for i in range(30)]
    await alice.close()
    await bob.close()


async def test_revoked_device_gets_nothing_more(inproc: InProcessServer, tmp_path: Path) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    alice2 = await link_device(alice, inproc, tmp_path / "alice2")
    await bob.send(alice.account_id, "before")
    assert texts(await alice2.receive(wait=5, until=1)) == ["before"]
    await alice.revoke(alice2.core.device_id)
    assert len(await alice.devices()) == 1
    await bob.send(alice.account_id, "after")  # Bob's first try addresses 2 devices: corrected
    assert texts(await alice.receive(wait=5, until=2)) == ["before", "after"]
    await alice2.close()
    again = open_profile(inproc, tmp_path / "alice2")
    try:
        await again.connect()
        raise AssertionError("a revoked device must not log in")
    except Exception as exc:
        assert getattr(exc, "code", "") == "unknown_device"
    finally:
        await again.close()
    await alice.close()
    await bob.close()


@pytest.fixture
async def unmetered_claims(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    """A server whose per-target claim budget does not step in before keys run low."""
    srv = await start_inprocess(tmp_path / "server", Limits(claim_target_burst=1000))
    try:
        yield srv
    finally:
        await srv.close()


async def test_newest_connection_of_a_device_wins(
    unmetered_claims: InProcessServer, tmp_path: Path
) -> None:
    inproc = unmetered_claims
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    await bob.close()
    first = await reconnect(inproc, tmp_path / "bob")
    second = open_profile(inproc, tmp_path / "bob")
    await second.connect()  # the server closes the first connection
    got = await first.transport.pushes.get()
    while got is not None:  # drain until the close arrives
        got = await first.transport.pushes.get()
    await first.close()  # closing the old one must not unhook the new one
    await alice.send(bob.account_id, "to the newest connection")
    assert texts(await second.receive(wait=5, until=1)) == ["to the newest connection"]
    # Notices reach the newest connection too: draining Bob's keys makes it refill them.
    claim = f.ClaimKeys(rid=0, account=bob.account_id, devices=[bob.core.device_id])
    for _ in range(20):
        await alice.transport.request(
            lambda rid: msgspec.structs.replace(claim, rid=rid), f.Bundles
        )
    await second.receive(wait=1.5)  # handles KeysLow by uploading
    for _ in range(10):
        answer = await alice.transport.request(
            lambda rid: msgspec.structs.replace(claim, rid=rid), f.Bundles
        )
        assert not answer.bundles[0].fallback
    await second.close()
    await alice.close()


async def test_messages_iterator_yields_as_they_arrive(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    import asyncio

    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    stream = bob.messages()
    for text in ("first", "second"):
        await alice.send(bob.account_id, text)
        message = await asyncio.wait_for(anext(stream), 10)
        assert (message.sender, message.text) == (alice.account_id, text)
    assert isinstance(stream, AsyncGenerator)  # closed like any async generator
    await stream.aclose()
    await alice.close()
    await bob.close()
