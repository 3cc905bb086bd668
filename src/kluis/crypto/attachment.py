"""Streaming encryption of attachments: AES-256-GCM in fixed chunks, under a fresh key per file.

Theory of operation (the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár, with
AES-GCM as the AEAD): the plaintext is cut into chunks of :data:`CHUNK` bytes; the last one may
be shorter, or empty (an empty file is one empty last chunk). Chunk ``i`` is sealed with the
96-bit nonce ``i`` (11 bytes, big-endian) followed by a flag byte, 1 on the last chunk and 0
otherwise, and with :data:`AAD` as associated data. The ciphertext is the concatenation of the
sealed chunks, each ``len(chunk) + 16`` bytes, nothing else: no header an attacker could edit.

- **reordering** or **swapping** two chunks changes the index they are opened under: refused;
- **truncation** at a chunk boundary makes a non-last chunk the last one (the flag differs):
  refused; anywhere else it makes the last chunk too short or breaks its tag: refused;
- **extension** past the last chunk opens the old last chunk as a non-last one: refused;
- **chunks from another file** are sealed under another key (a fresh random key per file): refused.

On top of the chunk tags, the message that carries the key also carries the SHA-256 digest of
the whole ciphertext and the plaintext size; :meth:`Decryptor.finish` checks both. A nonce is
never reused because a key seals exactly one file.

Both sides are incremental objects: feed bytes in any pieces, get bytes out, never the whole
file. No I/O here: the client's transfer code (``client/attachments.py``) reads and writes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kluis.errors import AttachmentCorrupt, LocalProtocolError

CHUNK = 64 * 1024  # plaintext bytes per chunk
TAG = 16  # GCM tag bytes per chunk
KEY_BYTES = 32
AAD = b"kluis-attachment-v1"
# 2^32 chunks of 64 KiB is 256 TiB: far beyond any limit, and well inside GCM's bounds per key.
MAX_CHUNKS = 2**32


def new_key() -> bytes:
    """A fresh random AES-256 key: one per file, never reused."""
    return secrets.token_bytes(KEY_BYTES)


def ciphertext_size(plaintext_size: int) -> int:
    """The exact size of the ciphertext of ``plaintext_size`` bytes."""
    if plaintext_size < 0:
        raise LocalProtocolError("a size cannot be negative")
    chunks = max(1, -(-plaintext_size // CHUNK))
    return plaintext_size + chunks * TAG


def _nonce(index: int, last: bool) -> bytes:
    if index >= MAX_CHUNKS:
        raise LocalProtocolError("attachment too large for one key")
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def _check_key(key: bytes) -> AESGCM:
    if len(key) != KEY_BYTES:
        raise LocalProtocolError(f"an attachment key has {KEY_BYTES} bytes")
    return AESGCM(key)


class Encryptor:
    """Encrypts one file: :meth:`update` with plaintext in any pieces, then :meth:`finish`.

    Each call returns the ciphertext ready so far; :attr:`digest` and :attr:`size` are valid
    after :meth:`finish`.
    """

    __slots__ = ("_aead", "_buf", "_done", "_hash", "_index", "size")

    def __init__(self, key: bytes) -> None:
        self._aead = _check_key(key)
        self._buf = bytearray()
        self._index = 0
        self._hash = hashlib.sha256()
        self._done = False
        self.size = 0  # plaintext bytes taken

    def _seal(self, chunk: bytes | bytearray, last: bool) -> bytes:
        sealed = self._aead.encrypt(_nonce(self._index, last), bytes(chunk), AAD)
        self._index += 1
        self._hash.update(sealed)
        return sealed

    def update(self, data: bytes) -> bytes:
        if self._done:
            raise LocalProtocolError("encryptor already finished")
        self.size += len(data)
        self._buf += data
        out: list[bytes] = []
        # A chunk is sealed only once a byte beyond it exists: until then it may be the last.
        start = 0
        while len(self._buf) - start > CHUNK:
            out.append(self._seal(self._buf[start : start + CHUNK], last=False))
            start += CHUNK
        if start:
            del self._buf[:start]
        return b"".join(out)

    def finish(self) -> bytes:
        if self._done:
            raise LocalProtocolError("encryptor already finished")
        self._done = True
        last = self._seal(self._buf, last=True)
        self._buf = bytearray()
        return last

    @property
    def digest(self) -> bytes:
        """SHA-256 of the whole ciphertext (after :meth:`finish`)."""
        if not self._done:
            raise LocalProtocolError("the digest is known once the encryptor has finished")
        return self._hash.digest()


class Decryptor:
    """Decrypts and checks one file against the key, digest and size its message carried.

    :meth:`update` returns plaintext of chunks already authenticated; :meth:`finish` opens the
    last chunk and checks the digest and size. Any failure raises :class:`AttachmentCorrupt`,
    and the caller must then discard whatever plaintext it was given.
    """

    __slots__ = ("_aead", "_buf", "_digest", "_done", "_expected", "_hash", "_index", "_out")

    def __init__(self, key: bytes, digest: bytes, size: int) -> None:
        self._aead = _check_key(key)
        self._digest = digest
        self._expected = size
        self._buf = bytearray()
        self._index = 0
        self._hash = hashlib.sha256()
        self._out = 0  # plaintext bytes given out
        self._done = False

    @property
    def ciphertext_size(self) -> int:
        """How many ciphertext bytes the sender's message announced."""
        return ciphertext_size(self._expected)

    def _open(self, sealed: bytes | bytearray, last: bool) -> bytes:
        try:
            plain = self._aead.decrypt(_nonce(self._index, last), bytes(sealed), AAD)
        except InvalidTag as exc:
            raise AttachmentCorrupt(
                f"chunk {self._index} does not authenticate (tampered, reordered or truncated)"
            ) from exc
        self._index += 1
        self._out += len(plain)
        if self._out > self._expected:
            raise AttachmentCorrupt("the attachment is longer than its message said")
        return plain

    def update(self, data: bytes) -> bytes:
        if self._done:
            raise LocalProtocolError("decryptor already finished")
        self._hash.update(data)
        self._buf += data
        out: list[bytes] = []
        start, sealed = 0, CHUNK + TAG
        while len(self._buf) - start > sealed:
            out.append(self._open(self._buf[start : start + sealed], last=False))
            start += sealed
        if start:
            del self._buf[:start]
        return b"".join(out)

    def finish(self) -> bytes:
        """Open the last chunk and check digest and size; return its plaintext."""
        if self._done:
            raise LocalProtocolError("decryptor already finished")
        self._done = True
        if len(self._buf) < TAG:
            raise AttachmentCorrupt("the attachment is truncated")
        plain = self._open(self._buf, last=True)
        self._buf = bytearray()
        if self._out != self._expected:
            raise AttachmentCorrupt("the attachment's size differs from what its message said")
        if not hmac.compare_digest(self._hash.digest(), self._digest):
            raise AttachmentCorrupt("the attachment's digest differs from its message's")
        return plain
