"""Groups over the in-memory transport: Megolm messages, membership changes, rotation."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from kluis.client import groups as gr
from kluis.client.client import KluisClient
from kluis.client.store.memory import MemoryStore
from kluis.crypto import seal
from kluis.errors import DecryptionError, LocalProtocolError, UntrustedDevice
from kluis.protocol import frames as f
from kluis.protocol.payload import MAX_GROUP_MEMBERS
from kluis.server.inprocess import InProcessServer
from tests.kluis_testing import link_device, register
from tests.test_conversations import record_requests


async def inbox(client: KluisClient, n: int = 1) -> list[tuple[str, str, str]]:
    got = await client.receive(wait=5, until=n)
    return [(m.conversation, m.sender, m.text) for m in got]


async def test_three_accounts_four_devices_and_a_removed_member(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    alice2 = await link_device(alice, inproc, tmp_path / "alice2")
    bob = await register(inproc, tmp_path / "bob")
    carol = await register(inproc, tmp_path / "carol")
    a, b, c = alice.account_id, bob.account_id, carol.account_id

    state = await alice.create_group("team", [b, c])
    g = state.id
    assert state.members == sorted([a, b, c])
    for member in (alice2, bob, carol):
        assert await inbox(member) == [(g, a, '* created the group "team"')]
        assert member.group(g).members == state.members and member.group(g).name == "team"

    # Everyone writes; every other device of every member reads it, the writer's own included.
    await alice.send(g, "hello team")
    for member in (alice2, bob, carol):
        assert await inbox(member, 2) == [(g, a, "hello team")]  # after our key, the message
    await bob.send(g, "hi from bob")
    for member in (alice, alice2, carol):
        assert await inbox(member, 1) == [(g, b, "hi from bob")]
    await alice2.send(g, "from alice's laptop")
    for member in (alice, bob, carol):
        assert await inbox(member, 1) == [(g, a, "from alice's laptop")]
    await carol.send(g, "carol here")
    for member in (alice, alice2, bob):
        assert await inbox(member, 1) == [(g, c, "carol here")]

    # Alice removes Carol: every device hears of it, Carol's included.
    await alice.change_group(g, "remove", [c])
    for member in (alice2, bob, carol):
        (line,) = await inbox(member)
        assert line[:2] == (g, a) and "removed" in line[2]
    assert not carol.group(g).member and c not in bob.group(g).members
    with pytest.raises(LocalProtocolError, match="no longer a member"):
        await carol.send(g, "still here?")

    # Alice's next message goes out on a new session that Carol never got.
    sent = record_requests(alice)
    await alice.send(g, "after carol left")
    sends = [frame for frame in sent if isinstance(frame, f.Send)]
    assert len(sends) == 2  # the new session's key over Olm, then the message itself
    for send in sends:
        assert c not in {part.account for part in send.to}
    send = sends[-1]
    bob_part = next(part for part in send.to if part.account == b)
    (to_bob,) = bob_part.envelopes
    # Hand Bob's envelope to Carol, resealed for her device (as a hostile server or member
    # forwarding it would): she holds no key for the session it was written with.
    opened = bob.core.open_envelope(f.InEnvelope(id=1, body=to_bob.body))
    assert opened is not None
    carol_device = carol.core.device_keys()
    forwarded = seal.seal(
        carol_device.seal,
        msgspec.msgpack.encode(opened.sealed),
        carol_device.ed25519.encode(),
    )
    reopened = carol.core.open_envelope(f.InEnvelope(id=1, body=forwarded))
    assert reopened is not None
    with pytest.raises(DecryptionError, match="no key for this group session"):
        carol.core.decrypt(reopened)
    assert "after carol left" not in [m.text for m in carol.history(g)]
    # The members still read it.
    assert await inbox(bob, 2) == [(g, a, "after carol left")]
    assert await inbox(alice2, 1) == [(g, a, "after carol left")]

    for client in (alice, alice2, bob, carol):
        await client.close()


async def test_outsiders_cannot_hand_out_group_keys_or_change_groups(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    mallory = await register(inproc, tmp_path / "mallory")
    g = (await alice.create_group("pair", [bob.account_id])).id
    await bob.receive(wait=5, until=1)

    # Mallory knows the group's ID (say, from a leaked screenshot): she is still no member.
    mallory.core.groups._save(  # her own device believes whatever she wants
        type(alice.group(g))(
            g, "pair", sorted([alice.account_id, bob.account_id, mallory.account_id]), 1, b"x" * 16
        )
    )
    key, _ = mallory.core.groups.key_shares(g, {bob.account_id: bob_devices(bob)})
    await mallory._send_payloads({bob.account_id: key})
    _, update, _ = mallory.core.groups.change(g, "add", [mallory.account_id])
    await mallory._send_payloads({bob.account_id: update})
    assert await bob.receive(wait=1) == []
    assert [type(e) for e in bob.errors] == [UntrustedDevice, UntrustedDevice]
    assert mallory.account_id not in bob.group(g).members
    for client in (alice, bob, mallory):
        await client.close()


def bob_devices(bob: KluisClient) -> list[str]:
    return [bob.core.device_id]


def test_group_sessions_rotate_by_count_time_and_departed_devices() -> None:
    now = [1_000_000]
    counter = iter(range(1, 1_000_000))
    book = gr.GroupBook(
        MemoryStore(),
        account=lambda: "a" * 16,
        device="dev-a",
        sign=lambda message: "sig",
        now_ms=lambda: now[0],
        random=lambda n: next(counter).to_bytes(n, "big"),
    )
    state, _ = book.create("big", [f"{i:016d}" for i in range(999)])
    assert len(state.members) == MAX_GROUP_MEMBERS
    with pytest.raises(LocalProtocolError, match="at most 1000"):
        book.create("too big", [f"{i:016d}" for i in range(1000)])

    devices = {"b" * 16: ["dev-b"], "c" * 16: ["dev-c"]}
    key, lacking = book.key_shares(state.id, devices)
    assert lacking == sorted(devices)
    book.shared(state.id, devices)
    first = key.session_id
    for _ in range(gr.ROTATE_MESSAGES - 1):
        book.encrypt(state.id, b"x")
    key, lacking = book.key_shares(state.id, devices)
    assert (key.session_id, lacking) == (first, [])  # still the same session, all hold it
    book.encrypt(state.id, b"x")
    key, lacking = book.key_shares(state.id, devices)  # the 100th message was sent: rotate
    assert key.session_id != first and lacking == sorted(devices)
    book.shared(state.id, devices)

    second = key.session_id
    now[0] += gr.ROTATE_MS
    key, _ = book.key_shares(state.id, devices)
    assert key.session_id != second  # a week old: rotate
    book.shared(state.id, devices)

    third = key.session_id
    del devices["c" * 16]  # a device we shared with is gone (revoked, or its account left)
    key, lacking = book.key_shares(state.id, devices)
    assert key.session_id != third and lacking == ["b" * 16]


async def test_a_group_timer_and_group_receipts_come_from_members(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    g = (await alice.create_group("timed", [bob.account_id])).id
    await bob.receive(wait=5, until=1)

    await alice.set_timer(g, 30)
    (line,) = await bob.receive(wait=5, until=1)
    assert (line.conversation, line.kind) == (g, "timer")
    assert bob.core.features.timers.seconds(g) == 30  # Bob's messages to the group now expire too
    sent = await bob.send(g, "gone in 30 s")
    assert sent.expires is not None
    (got,) = await alice.receive(wait=5, until=1)
    assert got.text == "gone in 30 s" and got.expires is not None

    # Alice read it: her read receipt reaches Bob, filed under the group.
    await alice.mark_read(g)
    await bob.receive(wait=2)
    (mine,) = [m for m in bob.history(g) if m.text == "gone in 30 s"]
    assert mine.receipt == "read"
    for c in (alice, bob):
        await c.close()
