"""What a message carries about an attachment: enough to fetch, decrypt and check it.

An :class:`AttachmentRef` rides inside the encrypted payload (``payload.File``), never in the
clear: the server sees only the blob's random ID in a ticket request, never its key, digest,
name or type. The blob's format is ``crypto/attachment.py``'s; transfers are
``client/attachments.py``'s.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

BlobIdStr = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]
Key = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Digest = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Size = Annotated[int, msgspec.Meta(ge=0, le=2**53)]


class AttachmentRef(msgspec.Struct, frozen=True):
    """One uploaded attachment: blob ``id`` on the server, AES-256 ``key``, SHA-256 ``digest``
    of the ciphertext, plaintext ``size``, and the sender's ``name`` and ``mime`` (untrusted:
    sanitise ``name`` before using it as a file name)."""

    id: BlobIdStr
    key: Key
    digest: Digest
    size: Size
    name: Annotated[str, msgspec.Meta(max_length=255)] = ""
    mime: Annotated[str, msgspec.Meta(max_length=127)] = ""


__all__ = ["AttachmentRef"]
