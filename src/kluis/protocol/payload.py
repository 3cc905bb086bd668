"""What travels inside Olm: a tagged union of payloads, each bound to sender, recipient and
conversation.

Theory of operation: the sender fills the binding fields for each recipient device before it
encrypts (``sender``/``sender_device``, ``recipient``/``recipient_device``, and ``to``, the
conversation), and the recipient checks them against the sealed claim and itself before it
believes anything else in the payload. The ``kind`` field is the tag: it names the struct
(``"text"``, ``"sync"``, ``"dummy"`` — the same strings earlier versions wrote, so the encoding
is unchanged — and ``"verify_*"`` for SAS verification). A tag this version does not know fails to decode, and the caller treats that as
an undecryptable message.
"""

from __future__ import annotations

from typing import Annotated, TypeAlias

import msgspec


class _Bound(msgspec.Struct, frozen=True, tag_field="kind"):
    id: bytes
    ts: int  # sender's clock, milliseconds since the epoch
    sender: str = ""  # account
    sender_device: str = ""
    recipient: str = ""  # account
    recipient_device: str = ""
    to: str = ""  # the conversation: the account it was written to


class Text(_Bound, frozen=True, tag="text"):
    """A message the user wrote to ``to``."""

    text: str = ""


class Sync(_Bound, frozen=True, tag="sync"):
    """A copy of a message we wrote to ``to``, for our own other devices (earlier versions; our
    own devices now get the very payload the conversation got)."""

    text: str = ""


class Dummy(_Bound, frozen=True, tag="dummy"):
    """Carries nothing: opens a fresh session after a broken one (session recovery)."""


# ---- SAS verification (kluis.client.verification): one flow is one ``txn``; every message but
# the request names the one device it is for (``for_device``), since a Send reaches every device
# of an account. Sizes are bounded: these come from peers.

_Txn = Annotated[bytes, msgspec.Meta(max_length=32)]
_Key = Annotated[str, msgspec.Meta(max_length=64)]
_Mac = Annotated[str, msgspec.Meta(max_length=64)]


class VerifyRequest(_Bound, frozen=True, tag="verify_request"):
    """Asks every device of ``to`` for an interactive SAS verification with the sender device."""

    txn: _Txn = b""


class VerifyAccept(_Bound, frozen=True, tag="verify_accept"):
    """A device takes the request up and commits to its SAS key before seeing the other's."""

    txn: _Txn = b""
    for_device: _Key = ""
    commitment: _Txn = b""


class VerifyKey(_Bound, frozen=True, tag="verify_key"):
    """An ephemeral SAS public key (the requester's first, then the accepter's)."""

    txn: _Txn = b""
    for_device: _Key = ""
    key: _Key = ""


class VerifyMac(_Bound, frozen=True, tag="verify_mac"):
    """Sent once the user confirmed the codes: MACs over the sender's identity and device key."""

    txn: _Txn = b""
    for_device: _Key = ""
    identity_mac: _Mac = ""
    device_mac: _Mac = ""


class VerifyDone(_Bound, frozen=True, tag="verify_done"):
    """The sender checked the other side's MAC: both sides now mark each other verified."""

    txn: _Txn = b""
    for_device: _Key = ""


class VerifyCancel(_Bound, frozen=True, tag="verify_cancel"):
    """Ends a flow without verifying anything (``code`` says why, e.g. ``mismatch``)."""

    txn: _Txn = b""
    for_device: _Key = ""
    code: Annotated[str, msgspec.Meta(max_length=32)] = ""
    reason: Annotated[str, msgspec.Meta(max_length=200)] = ""


VerifyPayload: TypeAlias = (
    VerifyRequest | VerifyAccept | VerifyKey | VerifyMac | VerifyDone | VerifyCancel
)

Payload: TypeAlias = Text | Sync | Dummy | VerifyPayload

__all__ = [
    "Dummy",
    "Payload",
    "Sync",
    "Text",
    "VerifyAccept",
    "VerifyCancel",
    "VerifyDone",
    "VerifyKey",
    "VerifyMac",
    "VerifyPayload",
    "VerifyRequest",
]
