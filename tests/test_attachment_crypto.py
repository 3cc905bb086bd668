"""crypto/attachment.py: chunked AES-256-GCM round trips, and every way to damage a blob refused."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kluis.crypto.attachment import (
    CHUNK,
    TAG,
    Decryptor,
    Encryptor,
    ciphertext_size,
    new_key,
)
from kluis.errors import AttachmentCorrupt, DecryptionError, LocalProtocolError


def seal(plain: bytes, key: bytes, piece: int = 10_000) -> tuple[bytes, bytes]:
    enc = Encryptor(key)
    out = [enc.update(plain[i : i + piece]) for i in range(0, len(plain), piece)]
    out.append(enc.finish())
    return b"".join(out), enc.digest


def chunks(sealed: bytes) -> list[bytes]:
    step = CHUNK + TAG
    return [sealed[i : i + step] for i in range(0, len(sealed), step)]


def open_(sealed: bytes, key: bytes, digest: bytes, size: int, piece: int = 7_777) -> bytes:
    dec = Decryptor(key, digest, size)
    out = [dec.update(sealed[i : i + piece]) for i in range(0, len(sealed), piece)]
    out.append(dec.finish())
    return b"".join(out)


SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5]


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_and_sizes(size: int) -> None:
    key, plain = new_key(), bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    sealed, digest = seal(plain, key)
    assert len(sealed) == ciphertext_size(size)
    assert digest == hashlib.sha256(sealed).digest()
    assert open_(sealed, key, digest, size) == plain
    assert plain[:64] not in sealed or size < 64


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 3 * CHUNK + 10), st.integers(1, 2 * CHUNK), st.integers(1, 2 * CHUNK))
def test_any_piece_sizes(size: int, piece_in: int, piece_out: int) -> None:
    key, plain = new_key(), b"\x5a" * size
    sealed, digest = seal(plain, key, piece_in)
    assert open_(sealed, key, digest, size, piece_out) == plain


def _fresh() -> tuple[bytes, bytes, bytes, bytes]:
    key = new_key()
    plain = b"".join(bytes([i]) * CHUNK for i in range(3)) + b"tail"
    sealed, digest = seal(plain, key)
    return key, plain, sealed, digest


def _refused(sealed: bytes, key: bytes, digest: bytes, size: int) -> None:
    with pytest.raises(AttachmentCorrupt):
        open_(sealed, key, digest, size)


def test_tampered_byte_refused() -> None:
    key, plain, sealed, digest = _fresh()
    for pos in (0, CHUNK + 3, len(sealed) - 1):
        damaged = bytearray(sealed)
        damaged[pos] ^= 1
        # with the damaged blob's own digest too: the chunk tag catches it
        _refused(bytes(damaged), key, hashlib.sha256(damaged).digest(), len(plain))
        _refused(bytes(damaged), key, digest, len(plain))


def test_truncated_at_a_chunk_boundary_refused() -> None:
    key, plain, sealed, _ = _fresh()
    cut = b"".join(chunks(sealed)[:3])  # drops the last chunk: chunk 2 is not marked last
    _refused(cut, key, hashlib.sha256(cut).digest(), 3 * CHUNK)
    _refused(sealed[:-1], key, hashlib.sha256(sealed[:-1]).digest(), len(plain) - 1)
    _refused(b"", key, hashlib.sha256(b"").digest(), 0)


def test_reordered_and_swapped_chunks_refused() -> None:
    key, plain, sealed, _ = _fresh()
    c = chunks(sealed)
    swapped = c[1] + c[0] + c[2] + c[3]
    _refused(swapped, key, hashlib.sha256(swapped).digest(), len(plain))
    # a chunk of another file (another key) at the same index
    _, _, other, _ = _fresh()
    mixed = c[0] + chunks(other)[1] + c[2] + c[3]
    _refused(mixed, key, hashlib.sha256(mixed).digest(), len(plain))


def test_extended_refused() -> None:
    key, plain, sealed, _ = _fresh()
    longer = sealed + chunks(sealed)[0]
    _refused(longer, key, hashlib.sha256(longer).digest(), len(plain) + CHUNK)
    _refused(longer, key, hashlib.sha256(longer).digest(), len(plain))


def test_digest_and_size_are_checked() -> None:
    key, plain, sealed, digest = _fresh()
    _refused(sealed, key, bytes(32), len(plain))
    _refused(sealed, key, digest, len(plain) + 1)
    _refused(sealed, key, digest, len(plain) - 1)
    _refused(sealed, new_key(), digest, len(plain))
    assert issubclass(AttachmentCorrupt, DecryptionError)


def test_misuse_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        Encryptor(b"short")
    enc = Encryptor(new_key())
    with pytest.raises(LocalProtocolError):
        _ = enc.digest
    enc.finish()
    with pytest.raises(LocalProtocolError):
        enc.update(b"more")
    with pytest.raises(LocalProtocolError):
        ciphertext_size(-1)
