"""Replies (issue 10): a message quotes an earlier one of the same conversation by its ID.

The payload field round-trips and older payloads still decode; the decoder takes any garbage in
it with a typed error; between real clients of an in-process server a reply shows its quote
from the recipient's own history; a reply naming a message of another conversation shows
nothing of it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kluis.errors import UnknownReply
from kluis.protocol.payload import MESSAGE_ID_BYTES, GroupText, Payload, Text
from kluis.server.inprocess import InProcessServer
from tests.kluis_testing import register
from tests.test_fuzz import BUDGET

_dec: msgspec.msgpack.Decoder[Payload] = msgspec.msgpack.Decoder(Payload)
_enc = msgspec.msgpack.Encoder()


def test_reply_to_round_trips_and_old_payloads_decode_as_not_a_reply() -> None:
    quoted = os.urandom(MESSAGE_ID_BYTES)
    for payload in (
        Text(id=b"1" * 16, ts=1, text="yes", to="peer", reply_to=quoted),
        GroupText(id=b"2" * 16, ts=2, text="me too", to="group", reply_to=quoted),
    ):
        assert _dec.decode(_enc.encode(payload)) == payload
    # A payload written before replies existed: no field at all.
    old = _enc.encode({"kind": "text", "id": b"3" * 16, "ts": 3, "text": "hi", "to": "peer"})
    decoded = _dec.decode(old)
    assert isinstance(decoded, Text) and decoded.reply_to == b""


def test_an_oversized_reply_id_is_refused_by_the_decoder() -> None:
    raw = _enc.encode({"kind": "text", "id": b"1", "ts": 1, "reply_to": b"x" * 17})
    with pytest.raises(msgspec.ValidationError):
        _dec.decode(raw)


@BUDGET
@given(
    kind=st.sampled_from(["text", "group_text"]),
    reply_to=st.binary(max_size=64)
    | st.text(max_size=20)
    | st.integers(-(2**63), 2**63 - 1)
    | st.none(),
)
def test_reply_field_of_any_shape_decodes_or_fails_typed(kind: str, reply_to: object) -> None:
    raw = _enc.encode({"kind": kind, "id": b"1" * 16, "ts": 1, "reply_to": reply_to})
    try:
        payload = _dec.decode(raw)
    except msgspec.ValidationError:
        assert not (isinstance(reply_to, bytes) and len(reply_to) <= MESSAGE_ID_BYTES)
        return
    assert isinstance(payload, Text | GroupText)
    assert isinstance(reply_to, bytes) and payload.reply_to == reply_to


async def test_a_reply_between_two_clients_shows_the_quote_on_both_sides(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    question = await alice.send(bob.account_id, "lunch at noon?")
    (got,) = await bob.receive(wait=5, until=1)
    assert got.id == question.id and got.reply_to == b""
    assert bob.quoted(got) is None  # not a reply

    answer = await bob.send(alice.account_id, "yes", reply_to=got.id)
    assert answer.reply_to == question.id
    (reply,) = await alice.receive(wait=5, until=1)
    assert (reply.text, reply.reply_to) == ("yes", question.id)
    quote = alice.quoted(reply)
    assert quote is not None and quote.text == "lunch at noon?"
    # From the history as well (stored with the message), on both sides.
    assert [m.reply_to for m in alice.history(bob.account_id)] == [b"", question.id]
    mine = bob.history(alice.account_id)[-1]
    assert (q := bob.quoted(mine)) is not None and q.text == "lunch at noon?"
    # The prefix the CLI accepts names exactly that message.
    assert bob.core.find_by_prefix(alice.account_id, question.id.hex()[:8]).id == question.id
    for c in (alice, bob):
        await c.close()


async def test_a_reply_to_another_conversations_message_reveals_nothing(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    carol = await register(inproc, tmp_path / "carol")
    secret = await bob.send(alice.account_id, "the secret plan")
    await alice.receive(wait=5, until=1)

    # Alice's client refuses to quote Bob's message to Carol.
    with pytest.raises(UnknownReply):
        await alice.send(carol.account_id, "look", reply_to=secret.id)
    with pytest.raises(UnknownReply):
        alice.keep(carol.account_id, "look", reply_to=b"short")
    with pytest.raises(UnknownReply):
        alice.core.find_by_prefix(carol.account_id, secret.id.hex()[:8])
    assert alice.outbox() == []

    # Carol learned the ID somehow and writes a reply naming it, bypassing her client's check.
    forged = Text(
        id=os.urandom(16), ts=carol.core._now_ms(), text="re:", to=alice.account_id,
        reply_to=secret.id,
    )  # fmt: skip
    await carol._send_payloads({alice.account_id: forged})
    (reply,) = await alice.receive(wait=5, until=1)
    assert reply.conversation == carol.account_id and reply.reply_to == secret.id
    assert alice.quoted(reply) is None  # "a message you do not have": never Bob's text
    # ... while in Bob's own conversation the same ID still finds it.
    assert alice.core.find_message(bob.account_id, secret.id) is not None
    for c in (alice, bob, carol):
        await c.close()


def test_a_reply_line_says_when_the_quote_is_missing_and_escapes_it() -> None:
    from datetime import UTC, datetime

    from kluis.apps.cli import message_json, message_line
    from kluis.client.records import Message

    when = datetime(2026, 1, 2, tzinfo=UTC)
    reply = Message("b" * 16, "b" * 16, when, "ok", id=b"\x02" * 16, reply_to=b"\xab" * 16)
    line = message_line(reply)
    assert line.split("\t")[2] == "[reply to abababab: a message you do not have] ok"
    assert json.loads(message_json(reply))["quote"] is None
    quote = Message("a" * 16, "b" * 16, when, "x\u202e" + "y" * 50)
    shown = message_line(reply, quote=quote).split("\t")[2]
    assert shown == "[reply to abababab: x\\u202e" + "y" * 38 + "…] ok"  # 40 characters in all


async def test_a_reply_in_a_group_quotes_the_groups_message(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    group = await alice.create_group("walks", [bob.account_id])
    await bob.receive(wait=5, until=1)  # the group's creation
    question = await alice.send(group.id, "sunday?")
    (got,) = await bob.receive(wait=5, until=1)
    assert got.conversation == group.id
    with pytest.raises(UnknownReply):  # a group message is not one of the 1:1 chat
        await bob.send(alice.account_id, "x", reply_to=got.id)
    await bob.send(group.id, "sure", reply_to=got.id)
    (reply,) = await alice.receive(wait=5, until=1)
    assert reply.conversation == group.id and reply.reply_to == question.id
    assert (quote := alice.quoted(reply)) is not None and quote.text == "sunday?"
    for c in (alice, bob):
        await c.close()
