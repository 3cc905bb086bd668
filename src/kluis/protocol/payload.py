"""What travels inside Olm: a tagged union of payloads, each bound to sender, recipient and
conversation.

Theory of operation: the sender fills the binding fields for each recipient device before it
encrypts (``sender``/``sender_device``, ``recipient``/``recipient_device``, and ``to``, the
conversation), and the recipient checks them against the sealed claim and itself before it
believes anything else in the payload. The ``kind`` field is the tag: it names the struct
(``"text"``, ``"sync"``, ``"dummy"`` — the same strings earlier versions wrote, so the encoding
is unchanged; issue 9 added ``"contact"``, ``"note"``, ``"timer"``, ``"receipt"``, the group
kinds, ``"file"`` and ``"verify_*"`` for SAS verification). A tag this version does not know
fails to decode, and the caller treats that as
an undecryptable message.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeAlias

import msgspec

from kluis.protocol.attachment import AttachmentRef

MAX_GROUP_MEMBERS = 1_000  # Signal's and WhatsApp's limit
GroupName = Annotated[str, msgspec.Meta(max_length=100)]
Members = Annotated[list[str], msgspec.Meta(max_length=MAX_GROUP_MEMBERS)]


class _Bound(msgspec.Struct, frozen=True, tag_field="kind"):
    id: bytes
    ts: int  # sender's clock, milliseconds since the epoch
    sender: str = ""  # account
    sender_device: str = ""
    recipient: str = ""  # account
    recipient_device: str = ""
    to: str = ""  # the conversation: the account it was written to


# A reply names the quoted message by its payload ID (16 random bytes), never by its text: the
# recipient shows the quote from its own history of the same conversation, or that it does not
# have it. Empty: not a reply. An older payload without the field decodes as not a reply.
MESSAGE_ID_BYTES = 16
ReplyTo = Annotated[bytes, msgspec.Meta(max_length=MESSAGE_ID_BYTES)]


class Text(_Bound, frozen=True, tag="text"):
    """A message the user wrote to ``to`` (``reply_to``: the ID of the message it quotes)."""

    text: str = ""
    expire_s: int = 0  # the conversation's disappearing-message timer as the sender sees it
    reply_to: ReplyTo = b""


class Sync(_Bound, frozen=True, tag="sync"):
    """A copy of a message we wrote to ``to``, for our own other devices (earlier versions; our
    own devices now get the very payload the conversation got)."""

    text: str = ""


class Dummy(_Bound, frozen=True, tag="dummy"):
    """Carries nothing: opens a fresh session after a broken one (session recovery)."""


class GroupUpdate(_Bound, frozen=True, tag="group_update"):
    """A group's new name and members (``to`` is the group's ID), sent over Olm to every member
    device, removed ones included, and signed by the device that made the change.

    ``version`` orders changes: a device keeps the highest (version, id) it has seen, so every
    member ends on the same state whatever order concurrent changes arrive in.
    """

    action: Literal["create", "rename", "add", "remove", "leave"] = "create"
    name: GroupName = ""
    members: Members = []  # account IDs after the change, sorted
    version: int = 0
    sig: str = ""  # by sender_device over signing.group_update_message(...)


class GroupKey(_Bound, frozen=True, tag="group_key"):
    """The key of the sender device's group session for ``to`` (a group), over Olm: the
    recipient can read that device's group messages from the key's index on."""

    session_id: Annotated[str, msgspec.Meta(max_length=64)] = ""
    session_key: Annotated[str, msgspec.Meta(max_length=1024)] = ""


class GroupText(_Bound, frozen=True, tag="group_text"):
    """A message to the group ``to``, encrypted once with Megolm for every member device (the
    recipient fields stay empty: the group session binds it to the group's members)."""

    text: str = ""
    expire_s: int = 0  # the group's disappearing-message timer as the sender sees it
    reply_to: ReplyTo = b""  # as Text's


class File(_Bound, frozen=True, tag="file", kw_only=True):
    """An attachment sent to ``to`` (an account or a group; in a group it travels in the group
    session): where the blob is and how to open it, and a caption."""

    attachment: AttachmentRef
    caption: str = ""
    expire_s: int = 0  # the conversation's disappearing-message timer as the sender sees it


# ---- messaging features (issue 9): contacts, notes, timers, receipts ------------------------------

# A Text's timer and a Timer payload: 0 (off) or 1 s .. 4 weeks on the wire; what a user may set
# is checked by the client (kluis.client.timers), the range here refuses a nonsense value.
MAX_TIMER_S = 4 * 7 * 24 * 3600
_TimerSeconds = Annotated[int, msgspec.Meta(ge=0, le=MAX_TIMER_S)]
_Name = Annotated[str, msgspec.Meta(max_length=64)]
_NoteText = Annotated[str, msgspec.Meta(max_length=16_000)]
_Ids = Annotated[list[bytes], msgspec.Meta(max_length=1_000)]


class ContactSync(_Bound, frozen=True, tag="contact"):
    """Our own device named ``account`` ``name`` (empty: forgot the name). Own account only."""

    account: str = ""
    name: _Name = ""


class NoteSync(_Bound, frozen=True, tag="note"):
    """Our own device wrote (or, with ``deleted``, deleted) note ``note``. Own account only."""

    note: str = ""
    text: _NoteText = ""
    deleted: bool = False


class Timer(_Bound, frozen=True, tag="timer"):
    """A member set the conversation's disappearing-message timer (0: off)."""

    seconds: _TimerSeconds = 0


class Receipt(_Bound, frozen=True, tag="receipt"):
    """The messages ``ids`` of the conversation reached (``delivered``) or were ``read`` by the
    receipt's sender; sent to the account that wrote them, never answered with a receipt."""

    status: Literal["delivered", "read"] = "delivered"
    ids: _Ids = []


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

Payload: TypeAlias = (
    Text
    | Sync
    | Dummy
    | GroupUpdate
    | GroupKey
    | GroupText
    | File
    | ContactSync
    | NoteSync
    | Timer
    | Receipt
    | VerifyPayload
)

__all__ = [
    "MAX_GROUP_MEMBERS",
    "MAX_TIMER_S",
    "MESSAGE_ID_BYTES",
    "AttachmentRef",
    "ContactSync",
    "Dummy",
    "File",
    "GroupKey",
    "GroupText",
    "GroupUpdate",
    "NoteSync",
    "Payload",
    "Receipt",
    "ReplyTo",
    "Sync",
    "Text",
    "Timer",
    "VerifyAccept",
    "VerifyCancel",
    "VerifyDone",
    "VerifyKey",
    "VerifyMac",
    "VerifyPayload",
    "VerifyRequest",
]
