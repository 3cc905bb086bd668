"""Conversations on the wire: one Send addresses every account of a conversation (and our own
other devices), all or nothing; a refusal names each account whose devices it got wrong."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kluis.client.client import KluisClient
from kluis.errors import FrameTooLarge, LocalProtocolError, MalformedFrame, MismatchedDevices
from kluis.protocol import frames as f
from kluis.server.config import Limits
from kluis.server.inprocess import InProcessServer
from tests.kluis_testing import link_device, register, start_inprocess


def record_requests(client: KluisClient) -> list[f.ClientFrame]:
    """Every request frame ``client`` sends from now on."""
    sent: list[f.ClientFrame] = []
    transport = client.transport
    request = transport.request

    async def recording(make, expect):  # type: ignore[no-untyped-def]
        def made(rid: int) -> f.ClientFrame:
            frame: f.ClientFrame = make(rid)
            sent.append(frame)
            return frame

        return await request(made, expect)

    transport.request = recording  # type: ignore[method-assign]
    return sent


async def test_one_send_carries_the_message_and_our_copy(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    alice2 = await link_device(alice, inproc, tmp_path / "alice2")
    await alice.send(bob.account_id, "warm-up")  # sessions and device lists in place
    await bob.receive(wait=5, until=1)
    await alice2.receive(wait=5, until=1)

    sent = record_requests(alice)
    await alice.send(bob.account_id, "one request")
    sends = [frame for frame in sent if isinstance(frame, f.Send)]
    assert len(sends) == 1
    assert {part.account for part in sends[0].to} == {bob.account_id, alice.account_id}

    # Each side files the message under the conversation: the other account.
    (got,) = await bob.receive(wait=5, until=1)
    assert (got.sender, got.conversation) == (alice.account_id, alice.account_id)
    (copy,) = await alice2.receive(wait=5, until=1)
    assert (copy.sender, copy.conversation) == (alice.account_id, bob.account_id)
    assert [m.text for m in alice2.history(bob.account_id)] == ["warm-up", "one request"]
    for c in (alice, alice2, bob):
        await c.close()


async def test_a_mismatch_names_the_account_and_nothing_is_stored(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    carol = await register(inproc, tmp_path / "carol")
    to_bob = await alice.encrypt(bob.account_id, alice.core.new_text(bob.account_id, "b"))
    # Alice knows Carol with one device; Carol then links a second one.
    await alice.encrypt(carol.account_id, alice.core.new_text(carol.account_id, "warm-up"))
    carol2 = await link_device(carol, inproc, tmp_path / "carol2")
    stale = await alice.encrypt(carol.account_id, alice.core.new_text(carol.account_id, "c"))
    assert [e.device for e in stale] == [carol.core.device_id]

    parts = [
        f.Addressed(account=bob.account_id, envelopes=to_bob),
        f.Addressed(account=carol.account_id, envelopes=stale),
    ]
    with pytest.raises(MismatchedDevices) as refused:
        await alice.transport.request(lambda rid: f.Send(rid=rid, to=parts), f.Done)
    assert refused.value.mismatched == [(carol.account_id, [carol2.core.device_id], [])]
    # All or nothing: Bob's part of the refused send was not stored either.
    assert await bob.receive(wait=0.3) == []

    # The client's own send refreshes the account the server named and gets through.
    await alice.send(carol.account_id, "to both of carol's devices")
    assert [m.text for m in await carol.receive(wait=5, until=1)] == ["to both of carol's devices"]
    assert [m.text for m in await carol2.receive(wait=5, until=1)] == ["to both of carol's devices"]
    for c in (alice, bob, carol, carol2):
        await c.close()


async def test_an_account_named_twice_is_refused(inproc: InProcessServer, tmp_path: Path) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    (env,) = await alice.encrypt(bob.account_id, alice.core.new_text(bob.account_id, "x"))
    part = f.Addressed(account=bob.account_id, envelopes=[env])
    with pytest.raises(MalformedFrame, match="each account once"):
        await alice.transport.request(lambda rid: f.Send(rid=rid, to=[part, part]), f.Done)
    assert await bob.receive(wait=0.3) == []
    for c in (alice, bob):
        await c.close()


def test_big_sends_are_cut_into_requests_the_server_takes() -> None:
    from kluis.client import client as client_module

    body = b"x" * 100_000
    parts = [
        f.Addressed(account=f"{i:016d}", envelopes=[f.OutEnvelope(device="d", body=body)])
        for i in range(25)
    ]  # 2.5 MB: more than one Send may carry
    batches = client_module._batches(parts)
    assert [p for batch in batches for p in batch] == parts  # all, in order, each once
    for batch in batches:
        size = sum(len(e.body) for part in batch for e in part.envelopes)
        assert size <= client_module._SEND_BYTES
    many = [
        f.Addressed(account=f"{i:016d}", envelopes=[f.OutEnvelope(device="d", body=b"y")] * 3)
        for i in range(1000)
    ]
    assert all(
        sum(len(p.envelopes) for p in batch) <= client_module._SEND_ENVELOPES
        for batch in client_module._batches(many)
    )


async def test_a_refusal_naming_no_request_answers_the_waiting_one(tmp_path: Path) -> None:
    server = await start_inprocess(tmp_path / "srv", Limits(max_frame_bytes=32 * 1024))
    try:
        alice = await register(server, tmp_path / "alice")
        big = f.OutEnvelope(device=alice.core.device_id, body=b"z" * 40_000)
        with pytest.raises(FrameTooLarge):
            await asyncio.wait_for(
                alice.transport.request(
                    lambda rid: f.Send.one(rid, alice.account_id, [big]), f.Done
                ),
                5,
            )
        await alice.close()
    finally:
        await server.close()


async def test_the_longest_text_arrives_and_a_longer_one_is_refused_before_sending(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    from kluis.client.client import MAX_TEXT_BYTES

    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    longest = "é" * (MAX_TEXT_BYTES // 2)  # two bytes each in UTF-8: exactly the limit
    await alice.send(bob.account_id, longest)
    assert [m.text for m in await bob.receive(wait=5, until=1)] == [longest]
    with pytest.raises(LocalProtocolError, match="at most 61,440 bytes"):
        await alice.send(bob.account_id, longest + "x")
    assert await bob.receive(wait=0.3) == []
    for c in (alice, bob):
        await c.close()
