"""What the client keeps in its profile and puts inside ciphertexts: plain, validated records.

Nothing here does I/O or cryptography; :mod:`kluis.client.core` reads and writes these.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from kluis.protocol.attachment import AttachmentRef
from kluis.protocol.frames import DeviceRecord, InEnvelope
from kluis.protocol.payload import (
    ContactSync,
    Dummy,
    NoteSync,
    Payload,
    Receipt,
    Sync,
    Text,
    Timer,
)

__all__ = [
    "ContactSync",
    "Dummy",
    "Identity",
    "Message",
    "NoteSync",
    "Opened",
    "Payload",
    "Pins",
    "Quarantined",
    "Receipt",
    "ReceivedFile",
    "Sealed",
    "StoredMessage",
    "Sync",
    "Text",
    "Timer",
    "clamp_ts",
]


class Identity(msgspec.Struct):
    account_pickle: str
    seal_private: bytes
    server: str
    account_id: str = ""
    link_token: str = ""  # set while this device waits for approval
    account_key: bytes = b""  # the account's identity key: only on the account's first device


class Pins(msgspec.Struct):
    account: str
    identity: str
    known: dict[str, DeviceRecord]  # every device ever trusted, by ed25519
    active: list[str]
    revoked: list[str] = []  # every revocation ever seen: such a device never comes back
    untrusted: list[tuple[str, str]] = []  # (device, why) in the last list the server gave


class Sealed(msgspec.Struct, frozen=True):
    """Inside the sealed box: who claims to send, and the Olm message."""

    account: str
    device: str
    curve: str  # the claimed device's Curve25519 key: a pre-key message must come from it
    type: int
    body: bytes


class StoredMessage(msgspec.Struct, frozen=True):
    # The conversation's ID (1:1: the other account). Stored under its first name, "peer".
    conversation: str = msgspec.field(name="peer")
    sender: str
    ts: int
    text: str
    attachment: AttachmentRef | None = None  # a file message: ``text`` is its caption
    # Issue 9 (defaults keep older rows readable): the payload's ID (receipts name it), when the
    # message disappears (ms on this device's clock, 0: never), and its kind ("" a text,
    # "timer" the system line of a timer change).
    id: bytes = b""
    expires: int = 0
    kind: str = ""
    local: bool = False  # written on this device (what we sent here): inbox does not show it
    reply_to: bytes = b""  # the ID of the message of this conversation it quotes (b"": none)


class Quarantined(msgspec.Struct, frozen=True):
    """An envelope that could not be read: kept as it came (still sealed), with why."""

    body: bytes
    code: str
    received: int


_MIN_TS, _MAX_TS = 0, 253_402_300_799_000  # datetime's range, in milliseconds


def clamp_ts(ts: int) -> int:
    return min(max(ts, _MIN_TS), _MAX_TS)


@dataclass(frozen=True, slots=True)
class Message:
    """A message as the user sees it."""

    sender: str
    conversation: str  # 1:1: the other account's ID, whoever wrote the message
    time: datetime
    text: str
    attachment: AttachmentRef | None = None  # a file message: ``text`` is its caption
    id: bytes = b""
    kind: str = "text"  # or "timer": a system line (the text says what changed)
    expires: datetime | None = None  # when it disappears from this device (None: never)
    receipt: str = ""  # our own sent messages, in history: "", "delivered" or "read"
    # A reply: the ID of the message it quotes. Show the quote from ClientCore.quoted(), which
    # looks in this conversation only; the ID alone reveals nothing.
    reply_to: bytes = b""

    @classmethod
    def from_stored(cls, m: StoredMessage) -> Message:
        time_ = datetime.fromtimestamp(clamp_ts(m.ts) / 1000, UTC)
        expires = datetime.fromtimestamp(clamp_ts(m.expires) / 1000, UTC) if m.expires else None
        return cls(
            m.sender,
            m.conversation,
            time_,
            m.text,
            attachment=m.attachment,
            id=m.id,
            kind=m.kind or "text",
            expires=expires,
            reply_to=m.reply_to,
        )


class ReceivedFile(msgspec.Struct):
    """An attachment that reached this device, until ``kluis fetch`` saved it."""

    attachment: AttachmentRef
    conversation: str
    sender: str
    saved: bool = False


@dataclass(frozen=True, slots=True)
class Opened:
    envelope: InEnvelope
    sealed: Sealed
