"""What travels inside Olm: a tagged union of payloads, each bound to sender, recipient and
conversation.

Theory of operation: the sender fills the binding fields for each recipient device before it
encrypts (``sender``/``sender_device``, ``recipient``/``recipient_device``, and ``to``, the
conversation), and the recipient checks them against the sealed claim and itself before it
believes anything else in the payload. The ``kind`` field is the tag: it names the struct
(``"text"``, ``"sync"``, ``"dummy"`` — the same strings earlier versions wrote, so the encoding
is unchanged; issue 9 added ``"contact"``, ``"note"``, ``"timer"`` and ``"receipt"``, see the
end of this module). A tag this version does not know fails to decode, and the caller treats that as
an undecryptable message.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeAlias

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
    expire_s: int = 0  # the conversation's disappearing-message timer as the sender sees it


class Sync(_Bound, frozen=True, tag="sync"):
    """A copy of a message we wrote to ``to``, for our own other devices (earlier versions; our
    own devices now get the very payload the conversation got)."""

    text: str = ""


class Dummy(_Bound, frozen=True, tag="dummy"):
    """Carries nothing: opens a fresh session after a broken one (session recovery)."""


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


Payload: TypeAlias = Text | Sync | Dummy | ContactSync | NoteSync | Timer | Receipt

__all__ = [
    "MAX_TIMER_S",
    "ContactSync",
    "Dummy",
    "NoteSync",
    "Payload",
    "Receipt",
    "Sync",
    "Text",
    "Timer",
]
