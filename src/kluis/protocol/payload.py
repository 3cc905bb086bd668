"""What travels inside Olm: a tagged union of payloads, each bound to sender, recipient and
conversation.

Theory of operation: the sender fills the binding fields for each recipient device before it
encrypts (``sender``/``sender_device``, ``recipient``/``recipient_device``, and ``to``, the
conversation), and the recipient checks them against the sealed claim and itself before it
believes anything else in the payload. The ``kind`` field is the tag: it names the struct
(``"text"``, ``"sync"``, ``"dummy"`` — the same strings earlier versions wrote, so the encoding
is unchanged). A tag this version does not know fails to decode, and the caller treats that as
an undecryptable message.
"""

from __future__ import annotations

from typing import TypeAlias

import msgspec

from kluis.protocol.attachment import AttachmentRef


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
    """A copy of a message we wrote to ``to``, for our own other devices."""

    text: str = ""


class Dummy(_Bound, frozen=True, tag="dummy"):
    """Carries nothing: opens a fresh session after a broken one (session recovery)."""


class File(_Bound, frozen=True, tag="file", kw_only=True):
    """An attachment sent to ``to``: where the blob is and how to open it, and a caption."""

    attachment: AttachmentRef
    caption: str = ""


Payload: TypeAlias = Text | Sync | Dummy | File

__all__ = ["AttachmentRef", "Dummy", "File", "Payload", "Sync", "Text"]
