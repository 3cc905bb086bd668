"""Two real clients and a third device, joined to a server application in memory."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kluis.client.client import KluisClient
from kluis.client.store import ProfileStore
from kluis.protocol import frames as f
from kluis.server.config import Limits
from kluis.server.inprocess import InProcessServer
from tests.integration.test_device_chain import send_raw
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


class _CountingCommits:
    """Bob's profile connection, counting commits; with ``fail``, a COMMIT fails (a crash, a
    full disk) and nothing of that transaction is kept."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db, self.commits, self.fail = db, 0, False

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            self.commits += 1
            if self.fail:
                raise sqlite3.OperationalError("disk I/O error (simulated)")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.db, name)


def counting_commits(client: KluisClient) -> _CountingCommits:
    store = client.core.store
    assert isinstance(store, ProfileStore)
    counter = _CountingCommits(store._db)
    store._db = counter  # type: ignore[assignment]
    return counter


async def test_a_bad_envelope_in_the_middle_of_a_push_is_quarantined_alone(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    bob_id = bob.account_id
    await alice.send(bob_id, "m0")
    assert texts(await bob.receive(wait=5, until=1)) == ["m0"]
    await bob.close()  # the next ones wait for Bob and come in one push
    await alice.send(bob_id, "m1")
    # Decrypts (its Olm session steps on), then fails: it names another conversation.
    await send_raw(alice, bob_id, alice.core.encrypt(bob_id, alice.core.new_text("x" * 16, "no")))
    await alice.send(bob_id, "m2")
    await alice.send(bob_id, "m3")

    bob = await reconnect(inproc, tmp_path / "bob")
    counter = counting_commits(bob)
    at_ack: list[int] = []  # commits made when the push's Ack went out
    request = bob.transport.request

    async def noting(make, expect):  # type: ignore[no-untyped-def]
        def made(rid: int) -> f.ClientFrame:
            frame: f.ClientFrame = make(rid)
            if isinstance(frame, f.Ack):
                at_ack.append(counter.commits)
            return frame

        return await request(made, expect)

    bob.transport.request = noting  # type: ignore[method-assign]
    assert texts(await bob.receive()) == ["m1", "m2", "m3"]
    # The whole push: one durable commit before its Ack (delivered receipts follow it).
    assert at_ack[0] == 1
    assert bob.quarantined == 1 and [e.code for e in bob.errors] == ["untrusted_device"]
    await bob.close()
    bob = await reconnect(inproc, tmp_path / "bob")
    assert await bob.receive() == []  # all four were acknowledged
    assert texts(bob.history(alice.account_id)) == ["m0", "m1", "m2", "m3"]
    await bob.close()
    await alice.close()


async def test_a_push_whose_commit_fails_is_not_acknowledged(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    bob_id = bob.account_id
    await bob.close()
    for i in range(3):
        await alice.send(bob_id, f"m{i}")  # the first one is a pre-key message

    bob = await reconnect(inproc, tmp_path / "bob")
    counting_commits(bob).fail = True  # the process dies (or the disk fails) at the commit
    with pytest.raises(sqlite3.OperationalError):
        await bob.receive()
    await bob.close()
    bob = await reconnect(inproc, tmp_path / "bob")
    assert bob.history() == []  # nothing of the push was kept...
    assert texts(await bob.receive()) == ["m0", "m1", "m2"]  # ...nor acknowledged: redelivered
    assert bob.errors == [] and bob.quarantined == 0
    await bob.close()
    await alice.close()
