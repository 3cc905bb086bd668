"""The second boundary to vodozemac: its short authentication string (SAS), wrapped.

vodozemac gives the ephemeral Diffie-Hellman, the HKDF bytes of the short code and the MACs;
the commitment, the message flow, the info strings and the emoji table are ours
(``kluis.client.verification``). Keys cross this boundary as unpadded base64 text; vodozemac
objects never leave this module, and its exceptions become ours.

Each :class:`SasKeys` is single-use: it agrees on one shared secret, once.
"""

from __future__ import annotations

from dataclasses import dataclass

import vodozemac as vz

from kluis.crypto.encoding import KEY_BYTES, canonical_b64
from kluis.errors import CryptoError, LocalProtocolError, MalformedFrame, VerificationFailed

EMOJI_COUNT = 7


@dataclass(frozen=True, slots=True)
class ShortCodeBytes:
    """What both users compare: 7 emoji indices (0..63) and 3 numbers (1000..9191)."""

    emoji_indices: tuple[int, ...]
    decimals: tuple[int, int, int]

    def __post_init__(self) -> None:
        if len(self.emoji_indices) != EMOJI_COUNT or not all(
            0 <= i < 64 for i in self.emoji_indices
        ):
            raise ValueError("a short code has 7 emoji indices in 0..63")


class EstablishedSas:
    """The shared secret of one SAS exchange: short code bytes and MACs."""

    __slots__ = ("_inner",)

    def __init__(self, inner: vz.EstablishedSas) -> None:
        self._inner = inner

    def short_code(self, info: str) -> ShortCodeBytes:
        try:
            raw = self._inner.bytes(info)
            indices = tuple(int(i) for i in raw.emoji_indices)
            a, b, c = (int(d) for d in raw.decimals)
        except (ValueError, TypeError) as exc:
            raise CryptoError("cannot derive the short code") from exc
        return ShortCodeBytes(indices, (a, b, c))

    def mac(self, message: str, info: str) -> str:
        try:
            return str(self._inner.calculate_mac(message, info))
        except (ValueError, TypeError) as exc:
            raise CryptoError("cannot compute the MAC") from exc

    def verify_mac(self, message: str, info: str, tag: str) -> None:
        """Raise VerificationFailed unless ``tag`` is the MAC of ``message`` (constant time)."""
        try:
            self._inner.verify_mac(message, info, tag)
        except (ValueError, TypeError) as exc:
            raise VerificationFailed("the peer's MAC does not match its keys") from exc


class SasKeys:
    """Our ephemeral Curve25519 half of one SAS exchange."""

    __slots__ = ("_inner", "_used")

    def __init__(self) -> None:
        self._inner = vz.Sas()
        self._used = False

    @property
    def public_key(self) -> str:
        return str(self._inner.public_key.to_base64())

    def agree(self, their_key: str) -> EstablishedSas:
        """The shared secret with ``their_key`` (canonical base64); once per SasKeys."""
        if self._used:
            raise LocalProtocolError("a SAS key agrees once")
        try:
            canonical_b64(their_key, KEY_BYTES, "SAS key")
            key = vz.Curve25519PublicKey.from_base64(their_key)
        except (ValueError, TypeError, MalformedFrame) as exc:
            raise VerificationFailed("the peer's SAS key is not a Curve25519 key") from exc
        try:
            established = self._inner.diffie_hellman(key)
        except (ValueError, TypeError) as exc:
            raise VerificationFailed("the SAS key agreement failed") from exc
        finally:
            self._used = True
        return EstablishedSas(established)
