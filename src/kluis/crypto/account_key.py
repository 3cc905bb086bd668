"""An account's identity key: Ed25519 from ``cryptography``, kept by the account's first device.

It certifies each device of the account and signs revocations (see ``kluis.identity``). It never
leaves the device that created it: a device added later, or revoked, holds no power over the
account. Public keys and signatures use the same unpadded base64 as the Olm keys, so
``olm.verify_signature`` checks them.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kluis.crypto.encoding import b64
from kluis.errors import LocalProtocolError

_RAW = serialization.Encoding.Raw


class AccountKey:
    __slots__ = ("_private",)

    def __init__(self, private: Ed25519PrivateKey | None = None) -> None:
        self._private = private or Ed25519PrivateKey.generate()

    @property
    def public(self) -> str:
        return b64(self._private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))

    def sign(self, message: bytes) -> str:
        return b64(self._private.sign(message))

    def private_bytes(self) -> bytes:
        return self._private.private_bytes(
            _RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @classmethod
    def from_private_bytes(cls, data: bytes) -> AccountKey:
        if len(data) != 32:
            raise LocalProtocolError("an account key is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(data))
