"""The client's side of the operator's features: the pinned operator key, announcements, the
subscription end, and checking a wipe order. Pure (no I/O): it reads and writes the profile
only through the ``ClientStore`` it is given.

Theory of operation: the operator's public key is pinned the first time a ``Welcome`` carries
one (at registration for a first device) and never replaced: a server that later names another
key gets its announcements and operator wipe orders refused. An announcement is shown only if
its signature verifies against the pinned key, it names the origin of the server this profile
uses, and its id was never seen (``seen`` tokens in the profile). It is stored as a message of
the conversation ``operator`` from the sender ``operator``.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from kluis.client.records import Message, StoredMessage
from kluis.client.store.protocol import ClientStore
from kluis.crypto.olm import verify_signature
from kluis.errors import BadSignature, ReplayError
from kluis.protocol import operator as op
from kluis.protocol.signing import origin

OPERATOR = "operator"  # the sender and conversation of announcements
NOTICE_DAYS = 14
_KEY = "operator_key"
_EXPIRES = "subscription_expires"
_enc = msgspec.msgpack.Encoder()


def pinned_key(store: ClientStore) -> str:
    raw = store.get(_KEY)
    return raw.decode() if raw else ""


def pin_key(store: ClientStore, key: str) -> None:
    """Trust on first use: keep the first operator key a server names, never another."""
    if key and not pinned_key(store):
        store.put(_KEY, key.encode())


def note_expiry(store: ClientStore, expires_at: int) -> None:
    store.put(_EXPIRES, str(int(expires_at)).encode())


def expiry(store: ClientStore) -> int | None:
    raw = store.get(_EXPIRES)
    return int(raw) if raw else None


def renewal_notice(store: ClientStore, now: float) -> str:
    """A line to show from 14 days before the subscription ends (and after), else ""."""
    end = expiry(store)
    if end is None or end - now > NOTICE_DAYS * 86_400:
        return ""
    date = datetime.fromtimestamp(end, UTC).date().isoformat()
    if end <= now:
        return f"notice: your subscription ended on {date}; renew with kluis licence renew"
    return f"notice: your subscription ends on {date}; renew with kluis licence renew"


def check_announcement(store: ClientStore, server_url: str, body: bytes) -> op.Announcement:
    """The announcement in an envelope body, or the error that refuses it (nothing stored)."""
    key = pinned_key(store)
    if not key:
        raise BadSignature("an announcement, but no operator key is pinned")
    signed, announcement = op.parse_announcement(body)
    verify_signature(key, op.announcement_message(signed.body), signed.sig)
    if announcement.server != origin(server_url):
        raise BadSignature(f"an announcement made for another server ({announcement.server})")
    if store.seen(b"ann:" + announcement.id.encode()):
        raise ReplayError("an announcement seen before")
    return announcement


def store_announcement(store: ClientStore, announcement: op.Announcement) -> Message:
    with store.transaction():
        store.mark_seen(b"ann:" + announcement.id.encode())
        m = StoredMessage(
            conversation=OPERATOR,
            sender=OPERATOR,
            ts=announcement.issued_at * 1000,
            text=announcement.text,
            id=bytes.fromhex(announcement.id),
            kind="",
        )
        store.add_message(OPERATOR, _enc.encode(m))
    return Message.from_stored(m)


def check_wipe(
    data: bytes, *, account: str, device: str, server_url: str, operator_key: str, identity: str
) -> op.WipeOrder:
    """The wipe order in ``data`` if it is for this device and signed by a key we trust."""
    order = op.decode_wipe(data)
    if (order.account, order.device) != (account, device):
        raise BadSignature("a wipe order for another device")
    if order.server != origin(server_url):
        raise BadSignature("a wipe order made for another server")
    key = operator_key if order.by == "operator" else identity
    if not key:
        raise BadSignature(f"a wipe order by the {order.by}, whose key we do not hold")
    verify_signature(key, op.wipe_message(order), order.sig)
    return order
