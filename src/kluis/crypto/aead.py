"""Authenticated encryption of stored records (ChaCha20-Poly1305, random 96-bit nonces)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from kluis.errors import DecryptionError


class RecordCipher:
    """Encrypts records bound to their location (``aad``) so they cannot be swapped around."""

    __slots__ = ("_aead", "_mac_key")

    def __init__(self, key: bytes) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._mac_key = hmac.new(key, b"kluis-record-mac", hashlib.sha256).digest()

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(blob[:12], blob[12:], aad)
        except (InvalidTag, ValueError) as exc:
            raise DecryptionError("stored record does not decrypt") from exc

    def blind(self, data: bytes) -> bytes:
        """A keyed digest, to index records (e.g. seen message ids) without revealing them."""
        return hmac.new(self._mac_key, data, hashlib.sha256).digest()
