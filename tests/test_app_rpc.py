"""The codec of the app's daemon methods (apps/app_rpc.py): every operation's parameters and
value, and every event, round-trip exactly; bad params are typed errors; long lines are cut."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kluis.apps.app_rpc import (
    INVALID_PARAMS,
    RpcError,
    TooLong,
    decode_event,
    decode_params,
    decode_result,
    encode,
    encode_event,
    encode_params,
    lines,
)
from kluis.apps.ops import EVENT_KINDS, OPERATIONS, BackendEvent, Offline, Online
from kluis.client.events import (
    ContactChanged,
    DeviceAlarm,
    MessageReceived,
    MessagesExpired,
    ReceiptReceived,
    Undecryptable,
    VerificationChanged,
    VerificationRequested,
)
from kluis.client.groups import GroupState
from kluis.client.records import Message
from kluis.client.verification import ShortCode, State, Status, Verification
from kluis.protocol.attachment import AttachmentRef

REF = AttachmentRef(
    id="0123456789abcdef" * 2, key=bytes(range(32)), digest=b"\xff" * 32, size=5, name="a.png"
)
WHEN = datetime(2026, 12, 7, 13, 0, 1, 123456, tzinfo=UTC)
MESSAGE = Message(
    "alice",
    "bob",
    WHEN,
    "hi \x00\n",
    attachment=REF,
    id=b"\x00\x01\xfe",
    kind="text",
    expires=WHEN + timedelta(days=1),
    receipt="read",
    reply_to=b"\x80" * 16,
)
TIMER_LINE = Message("alice", "g:x", WHEN, "timer set", kind="timer")
GROUP = GroupState("g:1", "Walks", ["alice", "bob"], 3, b"\x00" * 16, member=False)
CODE = ShortCode(tuple((f"e{i}", f"name {i}") for i in range(7)), (1000, 5000, 9191))
FLOW = Verification(b"txn\x00", "bob", "dev", State.COMPARING, CODE, "")

RESULTS: dict[str, object] = {
    "history": [MESSAGE, TIMER_LINE],
    "groups": [GROUP],
    "quarantined": 3,
    "send": MESSAGE,
    "create_group": GROUP,
    "change_group": GROUP,
    "verification_status": (Status.BROKEN, "a device changed"),
    "start_verification": FLOW,
    "confirm_verification": None,
    "cancel_verification": None,
    "contacts": {"bob": "Bob 🙂"},
    "set_contact": None,
    "timers": {"bob": 3600},
    "set_timer": TIMER_LINE,
    "mark_read": None,
    "renewal_notice": "ends soon",
    "outbox_refused": [("bob", "refused")],
    "send_file": MESSAGE,
    "save_file": Path("/tmp/x y/a.png"),
    "attachment_bytes": bytes(range(256)),
}
PARAMS: dict[str, dict[str, Any]] = {
    "history": {"conversation": None},
    "groups": {},
    "quarantined": {},
    "send": {"conversation": "bob", "text": "hé", "reply_to": b"\x00\xff"},
    "create_group": {"name": "Walks", "members": ["bob"]},
    "change_group": {"group": "g:1", "action": "rename", "accounts": [], "name": "Runs"},
    "verification_status": {"peer": "bob"},
    "start_verification": {"peer": "bob"},
    "confirm_verification": {"txn": b"\x01\x02", "match": True},
    "cancel_verification": {"txn": b"\x01"},
    "contacts": {},
    "set_contact": {"account": "bob", "name": "Bob"},
    "timers": {},
    "set_timer": {"conversation": "bob", "seconds": 60},
    "mark_read": {"conversation": "bob"},
    "renewal_notice": {},
    "outbox_refused": {},
    "send_file": {"conversation": "bob", "path": Path("/tmp/a b"), "caption": "look"},
    "save_file": {"ref": REF, "folder": Path("/tmp/in")},
    "attachment_bytes": {"ref": REF, "limit": 1 << 20},
}
EVENTS: list[BackendEvent] = [
    Online(),
    Offline("server gone", 1.5),
    MessageReceived(MESSAGE),
    Undecryptable("decryption_failed", "bad mac", "bob", "dev"),
    DeviceAlarm("unknown device"),
    ReceiptReceived("bob", "delivered", "bob", (b"\x01", b"\x02\x03")),
    ContactChanged("bob", "Bob"),
    MessagesExpired(2),
    VerificationRequested("bob"),
    VerificationChanged(FLOW),
]


def wire(value: object) -> Any:
    """As it crosses the socket: JSON text and back."""
    return msgspec.json.decode(msgspec.json.encode(value))


def test_every_operation_round_trips_its_params_and_value() -> None:
    assert set(RESULTS) == set(OPERATIONS) == set(PARAMS)
    for name in OPERATIONS:
        back = decode_result(name, wire(encode(RESULTS[name])))
        assert back == RESULTS[name] and type(back) is type(RESULTS[name]), name
        assert decode_params(name, wire(encode_params(name, PARAMS[name]))) == PARAMS[name], name


def test_every_event_kind_round_trips() -> None:
    assert {type(e) for e in EVENTS} == set(EVENT_KINDS)
    for event in EVENTS:
        assert decode_event(wire(encode_event(event))) == event
    with pytest.raises(msgspec.ValidationError):
        decode_event({"kind": "ConnectionUp", "event": {}})  # not one the app hears
    with pytest.raises(msgspec.ValidationError):
        decode_event({"kind": "ReceiptReceived", "event": {"conversation": "b"}})


@pytest.mark.parametrize(
    ("name", "params", "says"),
    [
        ("send", {"conversation": 5, "text": "x"}, "Expected `str`"),
        ("send", {"conversation": "b", "text": "x", "cc": "c"}, "unknown: ['cc']"),
        ("send", {"text": "x"}, "missing: ['conversation']"),
        ("send", {"conversation": "b", "text": "x", "reply_to": "not base64!"}, "base64"),
        ("set_timer", {"conversation": "b", "seconds": "ten"}, "Expected `int`"),
        ("change_group", {"group": "g", "action": "explode", "accounts": [], "name": None}, ""),
        ("attachment_bytes", {"ref": {**encode(REF), "key": "AAAA"}, "limit": 1}, "length"),
        ("send_file", {"conversation": "b", "path": "/x", "caption": "", "progress": 1}, ""),
    ],
)
def test_bad_params_are_typed_errors(name: str, params: dict[str, Any], says: str) -> None:
    with pytest.raises(RpcError) as refused:
        decode_params(name, params)
    assert refused.value.code == INVALID_PARAMS and says in str(refused.value)


async def test_lines_cuts_a_long_line_and_goes_on() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"one\n" + b"x" * 50 + b"\ntwo\n" + b"y" * 30)
    reader.feed_data(b"y" * 30 + b"\nthree\nrest")
    reader.feed_eof()
    got = [line async for line in lines(reader, 20)]
    assert [g if isinstance(g, bytes) else "long" for g in got] == [
        b"one",
        "long",
        b"two",
        "long",
        b"three",
    ]
    assert sum(isinstance(g, TooLong) for g in got) == 2


async def test_a_type_error_inside_an_operation_is_a_bug_not_bad_params() -> None:
    """Params are checked against the operation's hints before the call: a TypeError raised
    inside it is the daemon's fault (an internal error), not the caller's."""
    from kluis.apps.app_rpc import AppService, RpcError
    from kluis.apps.ops import ClientOps

    class Broken(ClientOps):
        def __init__(self) -> None:  # no client: contacts() fails before touching one
            pass

        async def contacts(self) -> dict[str, str]:
            raise TypeError("a bug")

    service = AppService(Broken())
    with pytest.raises(RuntimeError, match=r"app\.contacts failed"):
        await service.call("contacts", {}, None, 1)  # type: ignore[arg-type]
    with pytest.raises(RpcError) as refused:  # a caller's bad params stay theirs
        await service.call("contacts", {"extra": 1}, None, 1)  # type: ignore[arg-type]
    assert refused.value.code == -32602
