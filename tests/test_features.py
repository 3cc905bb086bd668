"""Issue 9 over the in-memory transport: receipts, disappearing messages, contacts, notes and
the conversation list between real clients of an in-process server."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from kluis.client.client import KluisClient
from kluis.client.events import ReceiptReceived
from kluis.client.store import ProfileStore
from kluis.protocol import frames as f
from kluis.protocol.payload import ContactSync, Payload, Receipt, Timer
from kluis.server.inprocess import InProcessServer
from tests.kluis_testing import link_device, register
from tests.test_conversations import record_requests


def later(*clients: KluisClient, seconds: float) -> None:
    """Move every client's clock ahead (time injected, never slept)."""
    for client in clients:
        real = client.core._clock
        client.core._clock = lambda real=real: real() + seconds  # type: ignore[misc]


async def test_read_receipts_arrive_when_enabled_and_never_when_disabled(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    one = await alice.send(bob.account_id, "one")
    assert [m.text for m in await bob.receive(wait=5, until=1)] == ["one"]
    assert await alice.receive(wait=2) == []  # the delivered receipt: not a message
    assert [m.receipt for m in alice.history(bob.account_id)] == ["delivered"]
    assert alice.core.features.drain() == [
        ReceiptReceived(bob.account_id, "delivered", bob.account_id, (one.id,))
    ]

    assert await bob.mark_read(alice.account_id) == 1
    await alice.receive(wait=2)
    assert [m.receipt for m in alice.history(bob.account_id)] == ["read"]
    assert [e.status for e in alice.core.features.drain()] == ["read"]  # type: ignore[union-attr]

    # Bob turns read receipts off: Alice learns of delivery, never of reading.
    bob.set_read_receipts(False)
    await alice.send(bob.account_id, "two")
    await alice.send(bob.account_id, "three")
    assert [m.text for m in await bob.receive(wait=5, until=2)] == ["two", "three"]
    sent = record_requests(bob)
    assert await bob.mark_read(alice.account_id) == 2
    assert bob.history(alice.account_id)  # reading history sends nothing either
    await bob.mark_read(None)
    assert [frame for frame in sent if isinstance(frame, f.Send)] == []
    await alice.receive(wait=2)
    assert [m.receipt for m in alice.history(bob.account_id)] == ["read", "delivered", "delivered"]
    # One delivered receipt answered the whole batch of two.
    (event,) = alice.core.features.drain()
    assert isinstance(event, ReceiptReceived) and event.status == "delivered"
    assert len(event.ids) == 2
    for c in (alice, bob):
        await c.close()


def raw_rows(profile: Path) -> int:
    with sqlite3.connect(profile / ProfileStore.DB) as db:
        return int(db.execute("SELECT count(*) FROM messages").fetchone()[0])


async def test_disappearing_messages_leave_every_device_including_the_senders(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    alice2 = await link_device(alice, inproc, tmp_path / "alice2")
    alice.core.features.timers.min_seconds = 1
    line = await alice.set_timer(bob.account_id, 2)
    assert (line.kind, line.text) == ("timer", "disappearing messages: 2 s")
    assert [m.text for m in await bob.receive(wait=5, until=1)] == [line.text]
    assert [m.text for m in await alice2.receive(wait=5, until=1)] == [line.text]
    assert bob.core.features.timers.seconds(alice.account_id) == 2
    assert alice2.core.features.timers.seconds(bob.account_id) == 2

    await alice.send(bob.account_id, "gone in two seconds")
    for c in (bob, alice2):
        await c.receive(wait=5, until=1)
    await alice.receive(wait=1)  # bob's delivered receipt
    counts = [raw_rows(tmp_path / n) for n in ("alice", "alice2", "bob")]
    assert counts == [2, 2, 2]  # the timer's system line and the message

    later(alice, alice2, bob, seconds=2.5)
    assert alice.sweep() == 1  # the sender's own copy too
    await alice2.receive(wait=0.2)  # each operation sweeps first
    assert bob.conversations()[0].unread == 0  # the text went; a timer line is never unread
    assert bob.history(alice.account_id)[-1].text == line.text
    assert [raw_rows(tmp_path / n) for n in ("alice", "alice2", "bob")] == [1, 1, 1]
    for c in (alice, alice2, bob):
        await c.close()


async def test_contacts_and_notes_follow_us_to_our_other_device(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    alice2 = await link_device(alice, inproc, tmp_path / "alice2")
    await alice.set_contact(bob.account_id, "Bob", rename=False)
    note = await alice.add_note("buy milk")
    assert await alice2.receive(wait=2) == []  # sync payloads are not messages
    assert alice2.contacts() == {bob.account_id: "Bob"}
    assert [n.text for n in alice2.notes()] == ["buy milk"]
    await alice2.delete_note(note)
    await alice2.set_contact(bob.account_id, "Robert", rename=True)
    await alice.receive(wait=2)
    assert alice.notes() == [] and alice.contact_name(bob.account_id) == "Robert"
    # Bob's devices learn nothing of it: the sync went to Alice's account only.
    sent = record_requests(alice)
    await alice.add_note("private")
    (send,) = [frame for frame in sent if isinstance(frame, f.Send)]
    assert [part.account for part in send.to] == [alice.account_id]
    assert await bob.receive(wait=1) == [] and bob.quarantined == 0
    for c in (alice, alice2, bob):
        await c.close()


async def test_hostile_feature_payloads_are_refused_without_harm(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    mallory = await register(inproc, tmp_path / "mallory")
    mine = await alice.send(bob.account_id, "to bob")
    await bob.receive(wait=5, until=1)
    await alice.receive(wait=1)
    core = mallory.core
    now = core._now_ms()
    hostile: list[Payload] = [
        # a timer in Alice's conversation with Bob, which Mallory is not in
        Timer(id=b"1" * 16, ts=now, to=bob.account_id, seconds=30),
        # a contact and a note: only Alice's own devices may sync those
        ContactSync(id=b"2" * 16, ts=now, to=alice.account_id, account="b" * 16, name="x"),
    ]
    for payload in hostile:
        await mallory._send_payloads({alice.account_id: payload})
    # receipts for a message Mallory never got, and for one never sent: ignored, not quarantined
    for ids in ([mine.id], [b"?" * 16]):
        receipt = Receipt(id=ids[0][:8] + b"r" * 8, ts=now, to=alice.account_id, ids=ids)
        await mallory._send_payloads({alice.account_id: receipt})
    assert await alice.receive(wait=2) == []
    assert alice.quarantined == 2
    assert alice.core.features.timers.seconds(bob.account_id) == 0
    assert alice.contacts() == {}
    assert [m.receipt for m in alice.history(bob.account_id)] == ["delivered"]
    # Mallory's own timer in its own conversation with Alice is fine.
    await mallory.set_timer(alice.account_id, 60)
    await alice.receive(wait=5, until=1)
    assert alice.core.features.timers.seconds(mallory.account_id) == 60
    assert alice.core.features.timers.seconds(bob.account_id) == 0
    for c in (alice, bob, mallory):
        await c.close()


async def test_conversation_list_unread_and_last_activity(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    carol = await register(inproc, tmp_path / "carol")
    await bob.send(alice.account_id, "b1")
    await bob.send(alice.account_id, "b2")
    await carol.send(alice.account_id, "c1")
    await alice.receive(wait=5, until=3)
    listed = [(i.conversation, i.unread) for i in alice.conversations()]
    assert listed == [(carol.account_id, 1), (bob.account_id, 2)]  # newest first
    await alice.send(bob.account_id, "reply")  # our own message: activity, not unread
    assert [(i.conversation, i.unread) for i in alice.conversations()] == [
        (bob.account_id, 2),
        (carol.account_id, 1),
    ]
    await alice.mark_read(bob.account_id)
    assert [i.unread for i in alice.conversations()] == [0, 1]
    for c in (alice, bob, carol):
        await c.close()


async def test_marking_a_chat_read_reads_only_what_came_after_its_mark(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    """The app marks the open chat read at each message: that must not read the whole history
    again each time, and still queue a receipt for exactly the new messages."""
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    for text in ("one", "two"):
        await alice.send(bob.account_id, text)
    await bob.receive(wait=5, until=2)
    assert await bob.mark_read(alice.account_id) == 2
    store = bob.core.store
    real = store.message_rows
    read: list[int] = []

    def counting(peer: str | None = None, after: int = 0) -> list[tuple[int, bytes]]:
        rows = real(peer, after)
        read.extend(seq for seq, _ in rows)
        return rows

    store.message_rows = counting  # type: ignore[method-assign]
    assert await bob.mark_read(alice.account_id) == 0
    assert read == []
    await alice.send(bob.account_id, "three")
    await bob.receive(wait=5, until=1)
    sent = record_requests(bob)
    assert await bob.mark_read(alice.account_id) == 1
    assert len(read) == 1  # the new message's row only
    (receipt,) = [frame for frame in sent if isinstance(frame, f.Send)]
    assert receipt.to[0].account == alice.account_id
    await alice.receive(wait=2)
    assert [m.receipt for m in alice.history(bob.account_id)] == ["read", "read", "read"]
    for c in (alice, bob):
        await c.close()


async def test_receipts_flushed_twice_at_once_go_once(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    """The app marks the chat read while events() still flushes the batch's delivered receipt:
    each pending receipt goes out once."""
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    await alice.send(bob.account_id, "hello")
    assert len(await bob.receive(wait=5, until=1, settle=False)) == 1
    assert bob.core.features.conversations.mark_read(alice.account_id) == 1
    sent = record_requests(bob)
    await asyncio.gather(bob.flush_receipts(), bob.flush_receipts())
    receipts = [frame for frame in sent if isinstance(frame, f.Send)]
    assert len(receipts) == 2  # delivered, then read: once each
    assert bob.core.features.receipts.pending() == []
    await alice.receive(wait=2)
    assert [m.receipt for m in alice.history(bob.account_id)] == ["read"]
    for c in (alice, bob):
        await c.close()
