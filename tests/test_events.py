"""KluisClient.events(): typed events over the in-memory transport."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import cast

from kluis.client.core import Sealed
from kluis.client.events import (
    ConnectionDown,
    ConnectionUp,
    DeviceAlarm,
    Event,
    MessageReceived,
    Undecryptable,
)
from kluis.protocol import frames as f
from kluis.server.inprocess import InProcessServer
from tests.integration.test_device_chain import (
    forged_envelope,
    insert_device,
    send_raw,
    stray_device,
)
from tests.kluis_testing import open_profile, reconnect, register
from tests.test_conversations import record_requests


async def next_event(stream: AsyncIterator[Event]) -> Event:
    return await asyncio.wait_for(anext(stream), 10)


async def test_messages_unreadable_envelopes_and_the_end_of_the_connection(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    mallory = await register(inproc, tmp_path / "mallory")
    stream = bob.events()
    assert await next_event(stream) == ConnectionUp()

    await alice.send(bob.account_id, "hello bob")
    event = await next_event(stream)
    assert isinstance(event, MessageReceived)
    assert (event.message.sender, event.message.text) == (alice.account_id, "hello bob")

    claim = Sealed(account="nosuchaccount234", device="x" * 43, curve="y" * 43, type=0, body=b"z")
    await send_raw(mallory, bob.account_id, [forged_envelope(bob.core.device_keys(), claim)])
    event = await next_event(stream)
    assert isinstance(event, Undecryptable) and event.code and event.reason
    assert (event.sender, event.device) == ("nosuchaccount234", "x" * 43)  # the claim
    assert bob.quarantined == 1

    newer = await reconnect(inproc, tmp_path / "bob")  # displaces this connection
    event = await next_event(stream)
    assert isinstance(event, ConnectionDown) and event.reason
    assert await anext(stream, None) is None  # the stream ends there
    await newer.close()
    for c in (alice, bob, mallory):
        await c.close()


async def test_a_device_our_identity_did_not_certify_raises_an_alarm(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    await alice.close()
    # A hostile server lists a device of its own in Alice's account.
    _, planted = stray_device(tmp_path, "planted")
    from kluis.protocol import frames as f

    sql, args = insert_device(alice.account_id, f.DeviceRecord(keys=planted, cert="A" * 86))
    db = sqlite3.connect(inproc.config.data_dir / "kluis.sqlite3")
    db.execute(sql, args)
    db.commit()
    db.close()

    alice = open_profile(inproc, tmp_path / "alice")
    stream = alice.events()
    assert await next_event(stream) == ConnectionUp()
    event = await next_event(stream)
    assert isinstance(event, DeviceAlarm) and planted.ed25519 in event.alarm
    assert isinstance(stream, AsyncGenerator)  # closed like any async generator
    await stream.aclose()
    await alice.close()


async def test_a_message_is_handed_over_before_its_ack_and_its_receipt(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    """What the app shows is stored first; the Ack and the delivered receipt (round trips of
    their own) follow once the application has the message."""
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    await bob.connect()
    sent = record_requests(bob)
    stream = bob.events()
    assert await next_event(stream) == ConnectionUp()

    await alice.send(bob.account_id, "hello")
    event = await next_event(stream)
    assert isinstance(event, MessageReceived) and event.message.text == "hello"
    assert [m.text for m in bob.history(alice.account_id)] == ["hello"]  # committed

    def settling() -> list[type]:
        return [type(frame) for frame in sent if isinstance(frame, f.Ack | f.Send)]

    assert settling() == []  # neither acknowledged nor answered yet
    assert [p.status for p, _ in bob.core.features.receipts.pending()] == ["delivered"]

    following = asyncio.ensure_future(anext(stream))  # the stream goes on: the batch settles
    await alice.receive(wait=5)
    assert [m.receipt for m in alice.history(bob.account_id)] == ["delivered"]
    assert settling() == [f.Ack, f.Send]
    assert bob.core.features.receipts.pending() == []
    assert not following.done()  # nothing else happened
    following.cancel()
    await asyncio.gather(following, return_exceptions=True)
    for c in (alice, bob):
        await c.close()


async def test_a_message_handed_over_but_not_acknowledged_is_not_shown_twice(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    stream = cast(AsyncGenerator[Event, None], bob.events())
    assert await next_event(stream) == ConnectionUp()
    await alice.send(bob.account_id, "once")
    event = await next_event(stream)
    assert isinstance(event, MessageReceived)
    await stream.aclose()  # the app stops before the Ack goes
    await bob.close()

    again = await reconnect(inproc, tmp_path / "bob")  # the server delivers it again
    assert await again.receive(wait=1) == []  # a duplicate: dropped, not shown
    assert again.errors == [] and again.quarantined == 0
    assert [m.text for m in again.history(alice.account_id)] == ["once"]
    await again.receive(wait=0.3)  # acknowledged now: nothing comes back
    newest = await reconnect(inproc, tmp_path / "bob")
    await again.close()
    assert await newest.receive(wait=0.5) == []
    for c in (alice, newest):
        await c.close()
