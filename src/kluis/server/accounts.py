"""Accounts, licences, device authentication, device linking and revocation.

Rules, checked here and nowhere else:
- an account exists only by redeeming a licence code, once; its ID is random and anonymous;
- a device is its Ed25519 key; it logs in by signing the server's fresh challenge;
- a device's published keys carry its own signature; a second device carries the signature of an
  existing device of the account over the new device's keys (the approval).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Callable

from kluis.crypto.olm import check_curve25519, verify_signature
from kluis.crypto.seal import check_public_key
from kluis.errors import (
    AccountExpired,
    BadSignature,
    KluisError,
    LicenceInvalid,
    LinkInvalid,
    MalformedFrame,
    QuotaExceeded,
    RateLimited,
    UnknownAccount,
    UnknownDevice,
)
from kluis.protocol import signing
from kluis.protocol.frames import DeviceKeys, DeviceRecord, PendingLink
from kluis.server.config import Limits
from kluis.server.keys import check_signed_key
from kluis.server.store import Account, SqliteStore

LICENCE_BYTES = 15  # 120 bits
_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_AUTH_REFUSED = "no such device, it was revoked, or the signature is wrong"
# A valid Ed25519 public key that signs nothing here: an unknown device costs the same check.
_DECOY_KEY = (
    base64.b64encode(
        bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    )
    .decode()
    .rstrip("=")
)


def new_licence_code() -> str:
    raw = base64.b32encode(secrets.token_bytes(LICENCE_BYTES)).decode()
    return "-".join(raw[i : i + 4] for i in range(0, len(raw), 4))


def normalise_licence(code: str) -> str:
    return code.replace("-", "").replace(" ", "").upper()


def licence_hash(code: str) -> bytes:
    return hashlib.sha256(b"kluis-licence-v1\x00" + normalise_licence(code).encode()).digest()


def new_account_id() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(16))


def new_link_token() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(12))


def check_device_keys(keys: DeviceKeys) -> None:
    """Well-formed keys, self-signed by the device's Ed25519 key; else a typed error."""
    try:
        check_curve25519(keys.curve25519)
        check_public_key(keys.seal)
    except Exception as exc:
        raise MalformedFrame("device keys are malformed") from exc
    verify_signature(
        keys.ed25519,
        signing.device_keys_message(keys.ed25519, keys.curve25519, keys.seal),
        keys.sig,
    )


class Accounts:
    def __init__(self, store: SqliteStore, clock: Callable[[], float], limits: Limits) -> None:
        self._store = store
        self._clock = clock
        self._link_ttl_s = limits.link_ttl_s
        self._max_keys = limits.max_keys_per_upload
        self._max_links = limits.max_pending_links
        self._max_devices = limits.max_devices_per_account
        self._device_ids: dict[str, frozenset[str]] = {}  # hot path of every send

    def _now(self) -> int:
        return int(self._clock())

    def create_licences(self, count: int, days: int) -> list[str]:
        codes = [new_licence_code() for _ in range(count)]
        self._store.add_licences([licence_hash(c) for c in codes], days, self._now())
        return codes

    def register(self, licence: str, keys: DeviceKeys, nonce: bytes, sig: str) -> Account:
        # The challenge first: existence is told only to the key's holder.
        verify_signature(keys.ed25519, signing.challenge_message(nonce, keys.ed25519), sig)
        check_device_keys(keys)
        if self._store.device(keys.ed25519) is not None:
            raise BadSignature("this device key is already registered")
        account = self._store.register(
            licence_hash(licence), new_account_id(), DeviceRecord(keys=keys), self._now()
        )
        if account is None:
            raise LicenceInvalid("licence code is unknown or already redeemed")
        return account

    def authenticate(self, device_id: str, nonce: bytes, sig: str) -> Account:
        # One answer for an unknown device, a revoked one and a bad signature, after one
        # signature check in each case: before login, no one learns which keys are in use.
        stored = self._store.device(device_id)
        key = device_id if stored is not None and not stored.revoked else _DECOY_KEY
        try:
            verify_signature(key, signing.challenge_message(nonce, device_id), sig)
        except KluisError as exc:
            raise UnknownDevice(_AUTH_REFUSED) from exc
        if key is _DECOY_KEY:
            raise UnknownDevice(_AUTH_REFUSED)
        assert stored is not None
        account = self._store.account(stored.account_id)
        if account is None:
            raise UnknownAccount("account is gone")
        if account.expires_at <= self._now():
            raise AccountExpired("subscription has ended; redeem a new licence")
        return account

    def devices(self, account_id: str) -> list[DeviceRecord]:
        if self._store.account(account_id) is None:
            raise UnknownAccount(f"no account {account_id!r}")
        return self._store.active_devices(account_id)

    def device_ids(self, account_id: str) -> frozenset[str]:
        ids = self._device_ids.get(account_id)
        if ids is None:
            ids = frozenset(r.keys.ed25519 for r in self.devices(account_id))
            self._device_ids[account_id] = ids
        return ids

    def request_link(self, link: PendingLink, nonce: bytes, sig: str) -> tuple[str, int]:
        # Cheapest first: caps and counts, then one signature, then the rest.
        keys = link.device
        if len(link.one_time_keys) > self._max_keys:
            raise QuotaExceeded(f"at most {self._max_keys} keys per upload")
        if self._store.count_links(self._now()) >= self._max_links:
            raise RateLimited("too many device links are pending; try again in a few minutes")
        verify_signature(keys.ed25519, signing.challenge_message(nonce, keys.ed25519), sig)
        if self._store.device(keys.ed25519) is not None:
            raise BadSignature("this device key is already registered")
        check_device_keys(keys)
        for k in [*link.one_time_keys, *([link.fallback_key] if link.fallback_key else [])]:
            check_signed_key(keys.ed25519, k)
        token, expires = new_link_token(), self._now() + self._link_ttl_s
        self._store.put_link(token, link, expires)
        return token, expires

    def link_keys(self, token: str) -> DeviceKeys:
        link = self._store.link(token, self._now())
        if link is None:
            raise LinkInvalid("link code is unknown or expired")
        return link.device

    def approve_link(
        self, account_id: str, approver: str, token: str, record: DeviceRecord
    ) -> None:
        pending = self.link_keys(token)
        if record.keys != pending or record.approver != approver:
            raise LinkInvalid("approval does not match the pending device")
        verify_signature(
            approver, signing.approval_message(account_id, record.keys), record.approval
        )
        if not self._store.add_device(account_id, record, token, self._now()):
            raise LinkInvalid("link code was used meanwhile")
        self._device_ids.pop(account_id, None)

    def check_room(self, account_id: str) -> None:
        """Refuse to link another device to a full account."""
        if len(self.device_ids(account_id)) >= self._max_devices:
            raise QuotaExceeded(f"an account has at most {self._max_devices} devices")

    def revoke(self, account_id: str, device_id: str) -> None:
        stored = self._store.device(device_id)
        if stored is None or stored.revoked or stored.account_id != account_id:
            raise UnknownDevice("no such device in this account")
        self._store.revoke_device(device_id)
        self._device_ids.pop(account_id, None)
