"""The one boundary to vodozemac: typed wrappers that translate its exceptions into ours.

Nothing else in Kluis imports vodozemac. Keys cross this boundary as unpadded base64 text,
messages as (type, bytes) pairs; vodozemac objects never leave this module.
"""

from __future__ import annotations

import vodozemac as vz

from kluis.crypto.encoding import KEY_BYTES, SIGNATURE_BYTES, canonical_b64
from kluis.errors import (
    BadSignature,
    CryptoError,
    DecryptionError,
    LocalProtocolError,
    MalformedFrame,
)

PRE_KEY = 0  # Olm's message type that can open a session (1 is a normal message)


def verify_signature(ed25519: str, message: bytes, signature: str) -> None:
    """Raise BadSignature unless ``signature`` is ``ed25519``'s signature over ``message``."""
    try:
        canonical_b64(ed25519, KEY_BYTES, "ed25519 key")
        canonical_b64(signature, SIGNATURE_BYTES, "signature")
        key = vz.Ed25519PublicKey.from_base64(ed25519)
        key.verify_signature(message, vz.Ed25519Signature.from_base64(signature))
    except (ValueError, TypeError, MalformedFrame) as exc:
        raise BadSignature("signature does not verify") from exc


def check_curve25519(key: str) -> None:
    """Raise CryptoError unless ``key`` is a Curve25519 public key in canonical encoding."""
    try:
        canonical_b64(key, KEY_BYTES, "curve25519 key")
        vz.Curve25519PublicKey.from_base64(key)
    except (ValueError, TypeError, MalformedFrame) as exc:
        raise CryptoError("not a Curve25519 public key") from exc


class OlmSession:
    """One Olm double-ratchet session with one peer device."""

    __slots__ = ("_inner",)

    def __init__(self, inner: vz.Session) -> None:
        self._inner = inner

    def encrypt(self, plaintext: bytes) -> tuple[int, bytes]:
        try:
            msg_type, body = self._inner.encrypt(plaintext).to_parts()
        except ValueError as exc:
            raise CryptoError("olm encryption failed") from exc
        return int(msg_type), bytes(body)

    def matches(self, msg_type: int, body: bytes) -> bool:
        """True when a pre-key message was made for this session (never for normal messages)."""
        if msg_type != PRE_KEY:
            return False
        try:
            pre = vz.AnyOlmMessage.from_parts(msg_type, body).to_pre_key()
            return pre is not None and bool(self._inner.session_matches(pre))
        except (ValueError, OverflowError):
            return False

    def decrypt(self, msg_type: int, body: bytes) -> bytes:
        try:
            return bytes(self._inner.decrypt(vz.AnyOlmMessage.from_parts(msg_type, body)))
        except (ValueError, OverflowError) as exc:  # a negative or huge type: OverflowError
            raise DecryptionError("olm message does not decrypt in this session") from exc

    def pickle(self, key: bytes) -> str:
        return str(self._inner.pickle(key))

    @classmethod
    def from_pickle(cls, data: str, key: bytes) -> OlmSession:
        try:
            return cls(vz.Session.from_pickle(data, key))
        except ValueError as exc:
            raise CryptoError("session pickle does not open") from exc


class OlmAccount:
    """A device's long-lived Olm identity: Ed25519 + Curve25519 keys and its one-time keys."""

    __slots__ = ("_inner",)

    def __init__(self, inner: vz.Account | None = None) -> None:
        self._inner = inner if inner is not None else vz.Account()

    @property
    def ed25519(self) -> str:
        return str(self._inner.ed25519_key.to_base64())

    @property
    def curve25519(self) -> str:
        return str(self._inner.curve25519_key.to_base64())

    @property
    def max_one_time_keys(self) -> int:
        return int(self._inner.max_number_of_one_time_keys)

    def sign(self, message: bytes) -> str:
        return str(self._inner.sign(message).to_base64())

    def generate_one_time_keys(self, count: int) -> None:
        self._inner.generate_one_time_keys(count)

    def generate_fallback_key(self) -> None:
        self._inner.generate_fallback_key()  # type: ignore[attr-defined]  # stub lags runtime

    def unpublished_one_time_keys(self) -> dict[str, str]:
        return {kid: k.to_base64() for kid, k in self._inner.one_time_keys.items()}

    def unpublished_fallback_key(self) -> dict[str, str]:
        fallback = self._inner.fallback_key  # type: ignore[attr-defined]  # stub lags runtime
        return {kid: k.to_base64() for kid, k in fallback.items()}

    def mark_keys_as_published(self) -> None:
        self._inner.mark_keys_as_published()

    def create_outbound_session(self, their_curve25519: str, their_one_time_key: str) -> OlmSession:
        try:
            inner = self._inner.create_outbound_session(
                vz.Curve25519PublicKey.from_base64(their_curve25519),
                vz.Curve25519PublicKey.from_base64(their_one_time_key),
            )
        except ValueError as exc:
            raise CryptoError("cannot open an Olm session with these keys") from exc
        return OlmSession(inner)

    def create_inbound_session(
        self, their_curve25519: str, msg_type: int, body: bytes
    ) -> tuple[OlmSession, bytes]:
        """Open a session from a pre-key message; consumes the one-time key it used."""
        if msg_type != PRE_KEY:
            raise DecryptionError("a new session can only start from a pre-key message")
        try:
            pre = vz.AnyOlmMessage.from_parts(msg_type, body).to_pre_key()
            if pre is None:
                raise DecryptionError("not a pre-key message")
            session, plaintext = self._inner.create_inbound_session(
                vz.Curve25519PublicKey.from_base64(their_curve25519), pre
            )
        except (ValueError, OverflowError) as exc:
            raise DecryptionError("pre-key message does not open a session") from exc
        return OlmSession(session), bytes(plaintext)

    def pickle(self, key: bytes) -> str:
        if len(key) != 32:
            raise LocalProtocolError("pickle key must be 32 bytes")
        return str(self._inner.pickle(key))

    @classmethod
    def from_pickle(cls, data: str, key: bytes) -> OlmAccount:
        try:
            return cls(vz.Account.from_pickle(data, key))
        except ValueError as exc:
            raise CryptoError("account pickle does not open") from exc
