"""Issue 9 in the sans-IO core: timers and expiry, receipts, contacts, notes and the
conversation list, between cores with no server, time injected (never slept)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec
import pytest

from kluis.client.core import ClientCore
from kluis.client.events import ContactChanged, MessagesExpired, NoteChanged, ReceiptReceived
from kluis.client.records import StoredMessage
from kluis.client.store import MemoryStore, ProfileStore
from kluis.crypto.profile_key import new_params
from kluis.errors import LocalProtocolError, UntrustedDevice
from kluis.protocol.payload import ContactSync, NoteSync, Payload, Receipt, Timer
from kluis.protocol.payload import Text as TextPayload
from tests.test_core import bundle, connect, deliver, make_core, record, show


class Clock:
    """Seconds since the epoch, moved by the test."""

    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def send(sender: ClientCore, receiver: ClientCore, payload: Payload, env_id: int) -> object:
    (env,) = sender.encrypt(receiver.account_id, payload)
    return deliver(receiver, env, env_id)


def stored(core: ClientCore) -> list[StoredMessage]:
    dec = msgspec.msgpack.Decoder(StoredMessage)
    return [dec.decode(v) for _, v in core.store.message_rows(None)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def disk_and_memory(tmp_path: Path, clock: Clock) -> tuple[ClientCore, ClientCore]:
    """Alice on the encrypted SQLite profile, Bob in memory, one clock for both."""
    alice = make_core(tmp_path, "alice", clock=clock, on_disk=True)
    bob = make_core(tmp_path, "bob", clock=clock)
    connect(alice, bob)
    return alice, bob


def test_a_two_second_timer_empties_both_stores(
    disk_and_memory: tuple[ClientCore, ClientCore], clock: Clock, tmp_path: Path
) -> None:
    alice, bob = disk_and_memory
    alice.features.timers.min_seconds = 1  # users may set 30 s at least; the rule is the same
    timer = alice.features.timers.new(bob.account_id, 2)
    line = send(alice, bob, timer, 1)
    alice.features.timers.record_sent(timer)
    assert bob.features.timers.seconds(alice.account_id) == 2
    assert alice.features.timers.seconds(bob.account_id) == 2
    assert getattr(line, "kind", "") == "timer"

    payload = alice.new_text(bob.account_id, "burn after reading")
    assert payload.expire_s == 2  # the timer travels inside the encrypted message
    send(alice, bob, payload, 2)
    alice.record_sent(payload)
    db = tmp_path / "alice" / ProfileStore.DB
    with sqlite3.connect(db) as raw:
        rows = raw.execute("SELECT seq, value FROM messages ORDER BY seq").fetchall()
    assert len(rows) == 2  # the timer line and the message
    doomed_ciphertext = bytes(rows[1][1])
    assert [m.text for m in bob.history(alice.account_id)][-1] == "burn after reading"

    clock.t += 1.9
    assert alice.features.timers.sweep() == [] and bob.features.timers.sweep() == []
    assert len(stored(alice)) == len(stored(bob)) == 2

    clock.t += 0.2  # 2.1 s after it was written
    assert [m.text for m in alice.history(bob.account_id)] == ["disappearing messages: 2 s"]
    assert [m.text for m in bob.features.timers.sweep()] == ["burn after reading"]
    assert [m.text for m in alice.features.timers.sweep()] == ["burn after reading"]
    alice.store.scrub()
    # Bob's MemoryStore: only the timer line is left.
    assert [(m.kind, m.text) for m in stored(bob)] == [("timer", "disappearing messages: 2 s")]
    assert bob.features.drain() == [MessagesExpired(1)]
    # Alice's SQLite rows: one left, and the deleted row's bytes are in no file of the profile.
    with sqlite3.connect(db) as raw:
        assert raw.execute("SELECT count(*) FROM messages").fetchone() == (1,)
    for path in (tmp_path / "alice").iterdir():
        assert doomed_ciphertext not in path.read_bytes(), path.name
    assert alice.features.receipts.state(payload.id) == ""  # its receipt record went too
    assert alice.store.get("expiry") is None  # nothing left to expire: sweeps read one record


def test_timers_are_validated_and_an_off_timer_keeps_messages(
    disk_and_memory: tuple[ClientCore, ClientCore], clock: Clock
) -> None:
    alice, bob = disk_and_memory
    for bad in (-1, 1, 29, 4 * 7 * 86400 + 1):
        with pytest.raises(LocalProtocolError, match="timer"):
            alice.features.timers.new(bob.account_id, bad)
    for good in (0, 30, 4 * 7 * 86400):
        assert alice.features.timers.new(bob.account_id, good).seconds == good
    send(alice, bob, alice.new_text(bob.account_id, "kept"), 1)
    clock.t += 10 * 365 * 86400
    assert bob.features.timers.sweep() == []
    assert [m.text for m in bob.history()] == ["kept"]
    # A value out of range on the wire does not decode.
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(
            msgspec.msgpack.encode({"kind": "timer", "id": b"x", "ts": 0, "seconds": 10**9}),
            type=Payload,
        )


def test_the_newest_timer_wins_whatever_the_order(
    disk_and_memory: tuple[ClientCore, ClientCore], clock: Clock
) -> None:
    alice, bob = disk_and_memory
    first = alice.features.timers.new(bob.account_id, 60)
    clock.t += 1
    second = alice.features.timers.new(bob.account_id, 0)
    send(alice, bob, second, 1)
    send(alice, bob, first, 2)  # arrives late: shown, but does not win
    assert bob.features.timers.seconds(alice.account_id) == 0
    assert [m.text for m in bob.history()] == [
        "disappearing messages: 1 min",
        "disappearing messages: off",
    ]


def test_a_peer_sets_timers_only_in_its_conversation_with_us(
    disk_and_memory: tuple[ClientCore, ClientCore], clock: Clock
) -> None:
    alice, bob = disk_and_memory
    elsewhere = Timer(id=b"t" * 16, ts=int(clock.t * 1000), to="c" * 16, seconds=30)
    with pytest.raises(UntrustedDevice, match="another conversation"):
        send(alice, bob, elsewhere, 1)
    assert bob.features.timers.seconds("c" * 16) == 0 and bob.history() == []


def test_receipts_update_only_messages_we_sent_there(tmp_path: Path, clock: Clock) -> None:
    alice = make_core(tmp_path, "alice", clock=clock)
    bob = make_core(tmp_path, "bob", clock=clock)
    carol = make_core(tmp_path, "carol", clock=clock)
    connect(alice, bob)
    connect(carol, alice)
    payload = alice.new_text(bob.account_id, "hi")
    alice.record_sent(payload)
    (env,) = alice.encrypt(bob.account_id, payload)
    deliver(bob, env)
    (pending, (receipt,)), *_ = bob.features.receipts.pending()
    assert (pending.status, pending.account, receipt.to, receipt.ids) == (
        "delivered",
        alice.account_id,
        alice.account_id,
        [payload.id],
    )
    # Carol names Alice's message to Bob, and one never sent: nothing changes.
    forged = Receipt(id=b"r" * 16, ts=0, to=alice.account_id, status="read", ids=[payload.id])
    send(carol, alice, forged, 10)
    bogus = Receipt(id=b"s" * 16, ts=0, to=alice.account_id, status="read", ids=[b"?" * 16])
    send(carol, alice, bogus, 11)
    assert alice.features.receipts.state(payload.id) == ""
    assert alice.features.drain() == []
    # Bob's receipt counts; read then delivered (late) stays read.
    (env,) = bob.encrypt(alice.account_id, receipt)
    assert deliver(alice, env, 12) is None
    read = Receipt(id=b"q" * 16, ts=0, to=alice.account_id, status="read", ids=[payload.id])
    send(bob, alice, read, 13)
    send(bob, alice, Receipt(id=b"p" * 16, ts=0, to=alice.account_id, ids=[payload.id]), 14)
    assert alice.features.receipts.state(payload.id) == "read"
    events = alice.features.drain()
    assert events[0] == ReceiptReceived(bob.account_id, "delivered", bob.account_id, (payload.id,))
    assert [e.status for e in events if isinstance(e, ReceiptReceived)] == [
        "delivered",
        "read",
        "delivered",
    ]
    assert alice.history()[0].receipt == "read"
    # A receipt is never answered with a receipt.
    assert alice.features.receipts.pending() == []


def test_read_marks_unread_counts_and_read_receipts(tmp_path: Path, clock: Clock) -> None:
    alice = make_core(tmp_path, "alice", clock=clock)
    bob = make_core(tmp_path, "bob", clock=clock)
    connect(alice, bob)
    for i in range(3):
        clock.t += 1
        send(alice, bob, alice.new_text(bob.account_id, f"m{i}"), i + 1)
    (info,) = bob.features.conversations.list()
    assert (info.conversation, info.unread) == (alice.account_id, 3)
    assert info.last_activity.timestamp() == pytest.approx(clock.t)
    receipts = bob.features.receipts
    receipts.sent(receipts.pending()[0][0])  # the delivered receipt went out

    receipts.set_read_enabled(False)
    assert bob.features.conversations.mark_read(alice.account_id) == 3
    assert bob.features.conversations.list()[0].unread == 0
    assert receipts.pending() == []  # off: no read receipt, ever

    receipts.set_read_enabled(True)
    send(alice, bob, alice.new_text(bob.account_id, "m3"), 9)
    receipts.sent(receipts.pending()[0][0])
    assert bob.features.conversations.mark_read(None) == 1
    ((pending, (receipt,)),) = receipts.pending()
    assert (pending.status, len(receipt.ids)) == ("read", 1)  # only what was newly read
    assert bob.features.conversations.mark_read(alice.account_id) == 0


def own_pair(tmp_path: Path, clock: Clock) -> tuple[ClientCore, ClientCore]:
    """Alice's first device and her laptop, each trusting both."""
    alice = make_core(tmp_path, "alice", clock=clock)
    laptop = make_core(tmp_path, "laptop", alice, clock=clock)
    both = (record(alice), record(laptop, alice))
    show(laptop, alice, *both)
    show(alice, alice, *both)
    alice.add_bundles(alice.account_id, [bundle(laptop, alice)])
    return alice, laptop


def test_contacts_and_notes_sync_to_our_own_devices(tmp_path: Path, clock: Clock) -> None:
    alice, laptop = own_pair(tmp_path, clock)
    bob_id = "b" * 16
    add = alice.features.contacts.set(bob_id, "Bob", rename=False)
    assert send(alice, laptop, add, 1) is None
    assert laptop.features.contacts.all() == {bob_id: "Bob"}
    with pytest.raises(LocalProtocolError, match="already"):
        alice.features.contacts.set(bob_id, "Bobby", rename=False)
    with pytest.raises(LocalProtocolError, match="not a contact"):
        alice.features.contacts.set("c" * 16, "Carol", rename=True)
    with pytest.raises(LocalProtocolError, match="control"):
        alice.features.contacts.set(bob_id, "Bob\x1b[2J")
    with pytest.raises(LocalProtocolError, match="account ID"):
        alice.features.contacts.set("nope", "x")
    clock.t += 1
    rename = alice.features.contacts.set(bob_id, "Bobby", rename=True)
    send(alice, laptop, rename, 2)
    send(alice, laptop, add, 3)  # a late, older copy changes nothing
    assert laptop.features.contacts.name(bob_id) == "Bobby"

    note = alice.features.notes.add("the safe's code is 1234")
    send(alice, laptop, note, 4)
    assert [(n.id, n.text) for n in laptop.features.notes.list()] == [
        (note.note, "the safe's code is 1234")
    ]
    clock.t += 1
    gone = laptop.features.notes.delete(note.note)
    (env,) = laptop.encrypt(alice.account_id, gone)  # to Alice's other device: the first one
    deliver(alice, env, 5)
    assert alice.features.notes.list() == laptop.features.notes.list() == []
    send(alice, laptop, note, 6)  # resent add: the tombstone holds
    assert laptop.features.notes.list() == []
    assert b"1234" not in (alice.store.get("notes") or b"")
    with pytest.raises(LocalProtocolError, match="no note"):
        alice.features.notes.delete(note.note)
    assert laptop.features.drain() == [
        ContactChanged(bob_id, "Bob"),
        ContactChanged(bob_id, "Bobby"),
        NoteChanged(note.note, False),
    ]


def test_another_account_cannot_touch_our_contacts_or_notes(
    disk_and_memory: tuple[ClientCore, ClientCore], clock: Clock
) -> None:
    mallory, bob = disk_and_memory
    contact = ContactSync(
        id=b"c" * 16, ts=0, to=bob.account_id, account=mallory.account_id, name="Your bank"
    )
    with pytest.raises(UntrustedDevice, match="own devices"):
        send(mallory, bob, contact, 1)
    note = NoteSync(id=b"n" * 16, ts=0, to=bob.account_id, note="0" * 8, text="planted")
    with pytest.raises(UntrustedDevice, match="own devices"):
        send(mallory, bob, note, 2)
    assert bob.features.contacts.all() == {} and bob.features.notes.list() == []
    # A text still gets through afterwards: nothing was wedged.
    assert send(mallory, bob, mallory.new_text(bob.account_id, "hi"), 3) is not None


def test_a_huge_receipt_does_not_decode() -> None:
    fields = {"kind": "receipt", "id": b"x", "ts": 0, "ids": [b"i"] * 1001}
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode(fields), type=Payload)
    assert isinstance(
        msgspec.msgpack.decode(
            msgspec.msgpack.encode({"kind": "text", "id": b"x", "ts": 0, "text": "old"}),
            type=Payload,
        ),
        TextPayload,
    )


def test_stores_list_and_delete_rows(tmp_path: Path) -> None:
    for store in (
        MemoryStore(),
        ProfileStore.create(tmp_path / "p", "pw", new_params(time_cost=1, memory_kib=8192)),
    ):
        store.add_message("a", b"1")
        store.add_message("b", b"2")
        store.add_message("a", b"3")
        rows = store.message_rows("a")
        assert [v for _, v in rows] == [b"1", b"3"]
        store.delete_messages([rows[0][0], 999])
        assert store.messages(None) == [b"2", b"3"]
        store.put("x", b"y")
        store.delete("x")
        assert store.get("x") is None and store.names("x") == []
        store.scrub()
        store.close()
