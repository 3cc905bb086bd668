"""Sealed sender: each envelope is encrypted to the recipient device's sealing key.

Theory of operation: an Olm pre-key message carries the sender's Curve25519 key in the clear, and
the server must not learn who writes to whom. So the whole Olm message, together with the
sender's account and device, goes inside a one-shot box the server cannot open: an ephemeral
X25519 key agreement with the recipient device's sealing key (published, signed by the device),
HKDF-SHA256, then ChaCha20-Poly1305. Every box uses a fresh ephemeral key, hence a fresh AEAD key,
so the all-zero nonce is safe. Only audited primitives from ``cryptography`` are used.

The box authenticates nothing about the sender (anyone can seal to a public key): the sender is
authenticated by the Olm session inside, whose identity key the recipient checks against the
claimed device.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kluis.crypto.encoding import KEY_BYTES, b64, canonical_b64
from kluis.errors import CryptoError, DecryptionError, MalformedFrame

VERSION = b"\x01"
_INFO = b"kluis-seal-v1"
_NONCE = bytes(12)
_RAW = serialization.Encoding.Raw
_PUB_RAW = serialization.PublicFormat.Raw


_b64 = b64


def _unb64(text: str) -> bytes:
    """Only the canonical spelling of a 32-byte key (no padding, no ignored trailing bits)."""
    try:
        return canonical_b64(text, KEY_BYTES, "sealing key")
    except MalformedFrame as exc:
        raise ValueError(str(exc)) from exc


def _key(shared: bytes, eph_pub: bytes, recipient_pub: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=eph_pub + recipient_pub, info=_INFO
    ).derive(shared)


class SealKeyPair:
    """A device's long-lived sealing key pair (X25519)."""

    __slots__ = ("_private",)

    def __init__(self, private: X25519PrivateKey | None = None) -> None:
        self._private = private or X25519PrivateKey.generate()

    @property
    def public(self) -> str:
        return _b64(self._private.public_key().public_bytes(_RAW, _PUB_RAW))

    def private_bytes(self) -> bytes:
        return self._private.private_bytes(
            _RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @classmethod
    def from_private_bytes(cls, data: bytes) -> SealKeyPair:
        return cls(X25519PrivateKey.from_private_bytes(data))

    def open(self, box: bytes, aad: bytes) -> bytes:
        """Open a box sealed to this key; raise DecryptionError if it was altered."""
        if len(box) < 1 + 32 + 16 or box[:1] != VERSION:
            raise DecryptionError("sealed envelope is malformed")
        eph_pub = box[1:33]
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(eph_pub))
            key = _key(shared, eph_pub, _unb64(self.public))
            return ChaCha20Poly1305(key).decrypt(_NONCE, box[33:], aad)
        except (InvalidTag, ValueError) as exc:
            raise DecryptionError("sealed envelope failed authentication (tampered?)") from exc


def check_public_key(public: str) -> None:
    try:
        raw = _unb64(public)
        X25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise CryptoError("not an X25519 public key") from exc


def seal(recipient_public: str, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt ``plaintext`` so that only the holder of ``recipient_public`` can read it."""
    try:
        recipient_raw = _unb64(recipient_public)
        recipient = X25519PublicKey.from_public_bytes(recipient_raw)
    except ValueError as exc:
        raise CryptoError("recipient sealing key is malformed") from exc
    eph = X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes(_RAW, _PUB_RAW)
    key = _key(eph.exchange(recipient), eph_pub, recipient_raw)
    return VERSION + eph_pub + ChaCha20Poly1305(key).encrypt(_NONCE, plaintext, aad)
