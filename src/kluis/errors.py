"""Every error Kluis raises, with a stable machine-readable code.

The server sends the same codes on the wire (``Error{code, message}``), so a client can map a
remote refusal back to the class below with :func:`error_for_code`.

    KluisError
    ├── LocalProtocolError        you misused the API (our bug or the caller's)
    │   └── StorageKeyError           storage_key: the PostgreSQL store's key file is missing,
    │                                 malformed, readable by others or not this database's
    │   └── BadConfig                 bad_config: a settings file (e.g. the app's keys.toml)
    │                                 that does not parse or names unknown actions or keys
    │   └── UnknownReply              unknown_reply: a reply to a message ID this conversation's
    │                                 history on this device does not hold (or a malformed ID)
    ├── RemoteProtocolError       the peer sent something that breaks the protocol
    │   ├── MalformedFrame            bad_frame: undecodable or schema-violating frame
    │   ├── FrameTooLarge             frame_too_large
    │   ├── Unauthenticated           unauthenticated: request before a valid signature
    │   ├── BadSignature              bad_signature
    │   ├── RateLimited               rate_limited
    │   ├── QuotaExceeded             quota_exceeded: recipient mailbox is full
    │   ├── LicenceInvalid            licence_invalid: unknown, expired or already redeemed
    │   ├── AccountExpired            account_expired: the subscription ended (sending refused)
    │   ├── AccountSuspended          account_suspended: the operator suspended the account
    │   ├── DeviceWiped               device_wiped: this device was ordered wiped and is gone
    │   ├── UnknownAccount            unknown_account
    │   ├── UnknownDevice             unknown_device
    │   ├── MismatchedDevices         mismatched_devices: a send did not address exactly the
    │   │                             current devices of the accounts it names (per account)
    │   ├── LinkInvalid               link_invalid: unknown or expired device-link code
    │   ├── BlobTooLarge              blob_too_large: an attachment over the server's limit
    │   ├── UnknownBlob               unknown_blob: no such blob (never uploaded, deleted, expired)
    │   ├── TicketInvalid             ticket_invalid: a blob ticket unknown, expired, used or
    │   │                             for another blob; a fetch confirmed before it completed
    │   ├── BadImage                  bad_image: a peer's image that is not previewed: too
    │   │                             large, malformed, truncated or not PNG/JPEG/GIF/WebP
    │   └── ServerError               internal: the server failed; nothing was changed
    ├── CryptoError
    │   ├── DecryptionError           decryption_failed: tampered or undecryptable envelope
    │   │   └── AttachmentCorrupt         attachment_corrupt: a blob that fails its chunk tags,
    │   │                                 digest or size (tampered, truncated, reordered)
    │   ├── ReplayError               replay: a message seen before
    │   ├── UntrustedDevice           untrusted_device: a device without a valid approval chain
    │   ├── KeyChanged                key_changed: a pinned identity key changed; sending to that
    │   │                             peer is refused until the change is acknowledged
    │   ├── VerificationFailed        verification_failed: a SAS verification did not succeed
    │   │                             (codes differ, a MAC or commitment fails, cancelled, timed out)
    │   ├── VerificationBroken        verification_broken: a verified account's identity or a
    │   │                             verified device changed; sending to it is refused until a
    │   │                             fresh SAS verification
    │   └── WrongPassphrase           wrong_passphrase: the profile key does not open the store
    └── TransportError                transport: connection lost, refused or timed out
        └── NotSent                   not_sent: a message that could not reach the server, kept
                                      in the outbox to go with the next command that connects
"""

from __future__ import annotations

from typing import ClassVar


class KluisError(Exception):
    """Base of every Kluis error; ``code`` is stable and machine-readable."""

    code: ClassVar[str] = "error"

    def __init__(self, message: str = "", **details: object) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class LocalProtocolError(KluisError):
    code = "local_protocol"


class StorageKeyError(LocalProtocolError):
    """The storage key file (``server/store/sealing.py``) is missing, malformed, readable by
    others, or not this database's; or a sealed value does not open under it."""

    code = "storage_key"


class BadConfig(LocalProtocolError):
    code = "bad_config"


class UnknownReply(LocalProtocolError):
    """A reply must quote a message of its own conversation that this device holds."""

    code = "unknown_reply"


class RemoteProtocolError(KluisError):
    code = "remote_protocol"


class MalformedFrame(RemoteProtocolError):
    code = "bad_frame"


class FrameTooLarge(RemoteProtocolError):
    code = "frame_too_large"


class Unauthenticated(RemoteProtocolError):
    code = "unauthenticated"


class BadSignature(RemoteProtocolError):
    code = "bad_signature"


class RateLimited(RemoteProtocolError):
    code = "rate_limited"


class QuotaExceeded(RemoteProtocolError):
    code = "quota_exceeded"


class LicenceInvalid(RemoteProtocolError):
    code = "licence_invalid"


class AccountExpired(RemoteProtocolError):
    code = "account_expired"


class AccountSuspended(RemoteProtocolError):
    code = "account_suspended"


class DeviceWiped(RemoteProtocolError):
    code = "device_wiped"


class UnknownAccount(RemoteProtocolError):
    code = "unknown_account"


class UnknownDevice(RemoteProtocolError):
    code = "unknown_device"


class MismatchedDevices(RemoteProtocolError):
    code = "mismatched_devices"

    def __init__(
        self, message: str = "", mismatched: list[tuple[str, list[str], list[str]]] | None = None
    ) -> None:
        super().__init__(message)
        # (account, missing devices, extra devices) for every account the send got wrong
        self.mismatched = mismatched or []

    @property
    def accounts(self) -> list[str]:
        return [account for account, _, _ in self.mismatched]


class LinkInvalid(RemoteProtocolError):
    code = "link_invalid"


class BlobTooLarge(RemoteProtocolError):
    code = "blob_too_large"


class UnknownBlob(RemoteProtocolError):
    code = "unknown_blob"


class TicketInvalid(RemoteProtocolError):
    code = "ticket_invalid"


class BadImage(RemoteProtocolError):
    code = "bad_image"


class ServerError(RemoteProtocolError):
    code = "internal"


class CryptoError(KluisError):
    code = "crypto"


class DecryptionError(CryptoError):
    code = "decryption_failed"


class AttachmentCorrupt(DecryptionError):
    code = "attachment_corrupt"


class ReplayError(CryptoError):
    code = "replay"


class UntrustedDevice(CryptoError):
    code = "untrusted_device"


class KeyChanged(CryptoError):
    code = "key_changed"


class VerificationFailed(CryptoError):
    code = "verification_failed"


class VerificationBroken(CryptoError):
    code = "verification_broken"


class WrongPassphrase(CryptoError):
    code = "wrong_passphrase"


class TransportError(KluisError):
    code = "transport"


class NotSent(TransportError):
    """The send could not reach the server; the message waits in the outbox (never on the wire:
    a local outcome only)."""

    code = "not_sent"


def _all_subclasses(cls: type[KluisError]) -> list[type[KluisError]]:
    out: list[type[KluisError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


_BY_CODE: dict[str, type[KluisError]] = {c.code: c for c in _all_subclasses(KluisError)}


def error_for_code(code: str, message: str, **details: object) -> KluisError:
    """Rebuild the typed error for a code received on the wire."""
    cls = _BY_CODE.get(code, RemoteProtocolError)
    return cls(message, **details)
