"""Megolm group sessions (vodozemac), behind typed wrappers like :mod:`kluis.crypto.olm`.

A sender encrypts a group message once with its outbound session; every member device that
received the session key (over Olm) decrypts it with an inbound session. A Megolm message names
neither its sender nor its session: the envelope carries the session ID, and the recipient
binds the session to the device that delivered its key.
"""

from __future__ import annotations

import vodozemac as vz

from kluis.errors import CryptoError, DecryptionError, LocalProtocolError


def _check_key(key: bytes) -> None:
    if len(key) != 32:
        raise LocalProtocolError("pickle key must be 32 bytes")


class OutboundGroupSession:
    """Our sending half of a group session; its index advances with every message."""

    __slots__ = ("_inner",)

    def __init__(self, inner: vz.GroupSession | None = None) -> None:
        self._inner = inner or vz.GroupSession()

    @property
    def session_id(self) -> str:
        return str(self._inner.session_id)

    @property
    def message_index(self) -> int:
        return int(self._inner.message_index)

    @property
    def session_key(self) -> str:
        """What a member device needs to decrypt from the current index on (over Olm only)."""
        return str(self._inner.session_key.to_base64())

    def encrypt(self, plaintext: bytes) -> bytes:
        try:
            return bytes(self._inner.encrypt(plaintext).to_bytes())
        except ValueError as exc:
            raise CryptoError("megolm encryption failed") from exc

    def pickle(self, key: bytes) -> str:
        _check_key(key)
        return str(self._inner.pickle(key))

    @classmethod
    def from_pickle(cls, data: str, key: bytes) -> OutboundGroupSession:
        try:
            return cls(vz.GroupSession.from_pickle(data, key))
        except ValueError as exc:
            raise CryptoError("group session pickle does not open") from exc


class InboundGroupSession:
    """A member's receiving half of another device's group session."""

    __slots__ = ("_inner",)

    def __init__(self, inner: vz.InboundGroupSession) -> None:
        self._inner = inner

    @classmethod
    def from_session_key(cls, session_key: str) -> InboundGroupSession:
        try:
            return cls(vz.InboundGroupSession(vz.SessionKey(session_key)))
        except (ValueError, TypeError) as exc:
            raise DecryptionError("not a group session key") from exc

    @property
    def session_id(self) -> str:
        return str(self._inner.session_id)

    def decrypt(self, message: bytes) -> tuple[int, bytes]:
        """(message index, plaintext). Replays decrypt again: the caller tracks indices."""
        try:
            decrypted = self._inner.decrypt(vz.MegolmMessage.from_bytes(message))
        except (ValueError, TypeError) as exc:
            raise DecryptionError("group message does not decrypt") from exc
        return int(decrypted.message_index), bytes(decrypted.plaintext)

    def pickle(self, key: bytes) -> str:
        _check_key(key)
        return str(self._inner.pickle(key))

    @classmethod
    def from_pickle(cls, data: str, key: bytes) -> InboundGroupSession:
        try:
            return cls(vz.InboundGroupSession.from_pickle(data, key))
        except ValueError as exc:
            raise CryptoError("group session pickle does not open") from exc
