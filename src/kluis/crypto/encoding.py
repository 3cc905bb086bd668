"""Canonical key encodings: each key or signature has exactly one accepted spelling.

Keys travel as unpadded standard base64. A decoder that ignores the unused low bits of the last
character, or accepts ``=`` padding, gives one key several spellings; then two strings that
compare unequal name the same key (a server could list a device "twice", or dodge a uniqueness
check). Every key string that enters Kluis from outside goes through :func:`canonical_b64`.
"""

from __future__ import annotations

import base64
import binascii

from kluis.errors import MalformedFrame

KEY_BYTES = 32
SIGNATURE_BYTES = 64


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def canonical_b64(text: str, size: int, what: str = "key") -> bytes:
    """Decode unpadded base64 of exactly ``size`` bytes, refusing any other spelling."""
    if len(text) != -(-size * 4 // 3) or "=" in text:
        raise MalformedFrame(f"{what} is not {size} bytes of unpadded base64")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedFrame(f"{what} is not base64") from exc
    if len(raw) != size or b64(raw) != text:
        raise MalformedFrame(f"{what} is not in canonical form")
    return raw
