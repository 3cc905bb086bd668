"""Account identity and the device chain: who is a device of an account, checkable by anyone.

Theory of operation: an account is its identity key (Ed25519), made by the account's first
device at registration and never shared. The account ID is derived from that key
(:func:`account_id_for`), so an ID a user hands out already names the key: a server cannot
answer for the account with another identity. The identity certifies each device
(:func:`certify`); a device is of the account exactly when its certificate verifies. A device ends
by a revocation signed by the identity or by the device itself; a client remembers every
revocation it has seen, so a server cannot bring a revoked device back by forgetting one.

:func:`evaluate` applies these rules to a device list as the server tells it; clients trust
only what it returns as trusted. Everything here checks canonical encodings first and turns
any failure into :class:`~kluis.errors.UntrustedDevice` or
:class:`~kluis.errors.MalformedFrame`.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field

from kluis.crypto.account_key import AccountKey
from kluis.crypto.encoding import KEY_BYTES, SIGNATURE_BYTES, canonical_b64
from kluis.crypto.olm import verify_signature
from kluis.errors import BadSignature, KluisError, MalformedFrame, UntrustedDevice
from kluis.protocol import signing
from kluis.protocol.frames import DeviceKeys, DeviceRecord, Revocation

ACCOUNT_ID_CHARS = 16  # base32: 80 bits of SHA-256 of the identity key
FINGERPRINT_CHARS = 26  # base32: 130 bits of SHA-256 of a linking device's keys


def account_id_for(identity: str) -> str:
    """The account ID that ``identity`` (an Ed25519 public key) stands for."""
    raw = canonical_b64(identity, KEY_BYTES, "identity key")
    digest = hashlib.sha256(b"kluis-account-id-v1\x00" + raw).digest()
    return base64.b32encode(digest).decode().lower()[:ACCOUNT_ID_CHARS]


def check_device_keys(keys: DeviceKeys) -> None:
    """Canonical keys, self-signed by the device's Ed25519 key; else a typed error."""
    canonical_b64(keys.ed25519, KEY_BYTES, "device key")
    canonical_b64(keys.curve25519, KEY_BYTES, "curve25519 key")
    canonical_b64(keys.seal, KEY_BYTES, "sealing key")
    canonical_b64(keys.sig, SIGNATURE_BYTES, "signature")
    message = signing.device_keys_message(keys.ed25519, keys.curve25519, keys.seal)
    verify_signature(keys.ed25519, message, keys.sig)


def certify(identity: AccountKey, account: str, keys: DeviceKeys) -> DeviceRecord:
    """The certificate that makes ``keys`` a device of ``account``."""
    return DeviceRecord(keys=keys, cert=identity.sign(signing.device_cert_message(account, keys)))


def check_certificate(account: str, identity: str, record: DeviceRecord) -> None:
    """Raise unless ``record`` is a well-formed device certified by ``identity`` for ``account``."""
    try:
        if account_id_for(identity) != account:
            raise UntrustedDevice(f"the identity key given for {account} is not its own")
        check_device_keys(record.keys)
        canonical_b64(record.cert, SIGNATURE_BYTES, "certificate")
        verify_signature(identity, signing.device_cert_message(account, record.keys), record.cert)
    except (BadSignature, MalformedFrame) as exc:
        raise UntrustedDevice(
            f"device {record.keys.ed25519[:8]}… is not certified by the identity of {account}"
        ) from exc


def revoke(identity: AccountKey, account: str, device: str) -> Revocation:
    return Revocation(device=device, sig=identity.sign(signing.revocation_message(account, device)))


def check_revocation(account: str, identity: str, revocation: Revocation) -> None:
    """Raise BadSignature unless the identity (or, ``by_self``, the device) signed it."""
    signer = revocation.device if revocation.by_self else identity
    canonical_b64(revocation.device, KEY_BYTES, "device key")
    canonical_b64(revocation.sig, SIGNATURE_BYTES, "signature")
    message = signing.revocation_message(account, revocation.device)
    verify_signature(signer, message, revocation.sig)


@dataclass(frozen=True, slots=True)
class ChainView:
    """A device list after the rules: what may be used, and what must raise an alarm."""

    trusted: list[DeviceRecord]
    revoked: frozenset[str]  # every device ever seen revoked, including earlier ones
    untrusted: list[tuple[str, str]] = field(default_factory=list)  # (device, why)


def evaluate(
    account: str,
    identity: str,
    records: list[DeviceRecord],
    revocations: list[Revocation],
    known: dict[str, DeviceRecord],
    known_revoked: frozenset[str],
) -> ChainView:
    """Check a device list against the account's identity and what we saw before.

    ``known`` are devices accepted earlier (a device's keys never change: a record with the same
    Ed25519 key and other keys is refused), ``known_revoked`` the revocations seen earlier.
    """
    if account_id_for(identity) != account:
        raise UntrustedDevice(f"the server gave {account} an identity key that is not its own")
    revoked = set(known_revoked)
    for rev in revocations:
        try:
            check_revocation(account, identity, rev)
        except KluisError:
            continue  # an unsigned "revocation" changes nothing
        revoked.add(rev.device)
    trusted: list[DeviceRecord] = []
    untrusted: list[tuple[str, str]] = []
    seen: set[str] = set()
    for record in records:
        device = record.keys.ed25519
        if device in seen:
            untrusted.append((device, "listed twice"))
            continue
        seen.add(device)
        if device in revoked:
            untrusted.append((device, "was revoked"))
            continue
        try:
            check_certificate(account, identity, record)
        except UntrustedDevice:
            untrusted.append((device, "not certified by the account's identity"))
            continue
        old = known.get(device)
        if old is not None and old.keys != record.keys:
            untrusted.append((device, "keys changed"))
            continue
        trusted.append(record)
    return ChainView(trusted=trusted, revoked=frozenset(revoked), untrusted=untrusted)


def safety_number(account: str, identity: str) -> str:
    """30 digits naming an account's identity, for comparing out of band.

    Adding or revoking a device does not change it; two people who see the same number for an
    account see the same identity key, hence the same set of devices it certifies.
    """
    raw_identity = canonical_b64(identity, KEY_BYTES, "identity key")
    digest = hashlib.sha256(
        b"\x00".join([b"kluis-safety-number-v2", account.encode(), raw_identity])
    )
    raw = digest.digest()
    groups = [int.from_bytes(raw[i : i + 5], "big") % 100_000 for i in range(0, 30, 5)]
    return " ".join(f"{g:05d}" for g in groups)


def link_fingerprint(keys: DeviceKeys) -> str:
    """130-bit check code over a linking device's keys (26 base32 letters): typed or scanned by
    the approving device, so a server cannot swap in keys of its own (no feasible collision)."""
    message = signing.device_keys_message(keys.ed25519, keys.curve25519, keys.seal)
    digest = hashlib.sha256(b"kluis-link-v2\x00" + message).digest()
    return base64.b32encode(digest).decode().lower()[:FINGERPRINT_CHARS]
