"""Pad plaintexts into size buckets so ciphertext length says little about message length."""

from __future__ import annotations

from kluis.errors import DecryptionError

_BUCKETS = (64, 256, 1024, 4096, 16384, 65536)


def bucket_size(length: int) -> int:
    for b in _BUCKETS:
        if length <= b:
            return b
    return -(-length // 65536) * 65536


def pad(data: bytes) -> bytes:
    """Append 0x80 then zeros up to the bucket size (ISO/IEC 7816-4 style, unambiguous)."""
    body = data + b"\x80"
    return body + bytes(bucket_size(len(body)) - len(body))


def unpad(data: bytes) -> bytes:
    end = data.rstrip(b"\x00")
    if not end.endswith(b"\x80"):
        raise DecryptionError("bad padding")
    return end[:-1]
