"""Signed formats of the operator's side: announcements and wipe orders.

Theory of operation: the operator holds an Ed25519 key of its own (``kluis admin init``), apart
from the server, which publishes only its public half (``Welcome.operator``); a client pins that
key the first time it sees it. An *announcement* is a text signed by that key over a unique
id, its time and the server's origin, so a database thief cannot write one, and one taken from
another server (or shown before) is refused. It travels as an ordinary envelope whose body
starts with :data:`ANNOUNCEMENT_PREFIX` (no sealing: it is for everyone, and the signature is
what counts). A *wipe order* names one device of one account on one server, and is signed by
the operator key (``by="operator"``) or by the account's identity key (``by="owner"``).

Pure: no I/O; the signatures are made and checked by the callers with ``crypto``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from kluis.errors import BadSignature, MalformedFrame
from kluis.protocol.frames import IdStr, KeyStr, SigStr, Stamp

ANNOUNCEMENT_PREFIX = b"\x00kluis-announcement\x00"
MAX_ANNOUNCEMENT_TEXT = 4000
_ANNOUNCEMENT_CONTEXT = b"kluis-announcement-v1\x00"
_WIPE_CONTEXT = b"kluis-wipe-v1\x00"

Origin = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
AnnouncementId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]  # 128 random bits


class Announcement(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: AnnouncementId
    issued_at: Stamp
    server: Origin  # signing.origin of the server it was made for
    text: Annotated[str, msgspec.Meta(max_length=MAX_ANNOUNCEMENT_TEXT)]


class SignedAnnouncement(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    body: bytes  # msgpack of Announcement: the signature covers these exact bytes
    sig: SigStr  # by the operator key over announcement_message(body)


class WipeOrder(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Erase ``device`` of ``account``: signed by the operator or by the account identity."""

    account: IdStr
    device: KeyStr
    server: Origin
    issued_at: Stamp
    by: Literal["operator", "owner"]
    sig: SigStr = "-"  # over wipe_message(...); "-" while unsigned


_enc = msgspec.msgpack.Encoder()
_ann_dec = msgspec.msgpack.Decoder(Announcement)
_signed_dec = msgspec.msgpack.Decoder(SignedAnnouncement)
_wipe_dec = msgspec.msgpack.Decoder(WipeOrder)
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)


def announcement_message(body: bytes) -> bytes:
    return _ANNOUNCEMENT_CONTEXT + body


def wipe_message(order: WipeOrder) -> bytes:
    fields = [order.account, order.device, order.server, order.issued_at, order.by]
    return _WIPE_CONTEXT + _enc.encode(fields)


def encode_announcement(announcement: Announcement) -> bytes:
    return _enc.encode(announcement)


def announcement_envelope(signed: SignedAnnouncement) -> bytes:
    """The body of the envelope that carries ``signed`` to a device."""
    return ANNOUNCEMENT_PREFIX + _enc.encode(signed)


def is_announcement(body: bytes) -> bool:
    return body.startswith(ANNOUNCEMENT_PREFIX)


def parse_announcement(body: bytes) -> tuple[SignedAnnouncement, Announcement]:
    """Decode an announcement envelope (signature unchecked); MalformedFrame if it is none."""
    try:
        signed = _signed_dec.decode(body[len(ANNOUNCEMENT_PREFIX) :])
        return signed, _ann_dec.decode(signed.body)
    except _DECODE_ERRORS as exc:
        raise MalformedFrame("not a valid announcement") from exc


def encode_wipe(order: WipeOrder) -> bytes:
    return _enc.encode(order)


def decode_wipe(data: bytes) -> WipeOrder:
    try:
        return _wipe_dec.decode(data)
    except _DECODE_ERRORS as exc:
        raise BadSignature("not a valid wipe order") from exc
