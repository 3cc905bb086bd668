"""Accounts, licences, device authentication, device linking and revocation.

Rules, checked here and nowhere else:
- an account exists only by redeeming a licence code, once; its ID is random and anonymous;
- a device is its Ed25519 key; it logs in by signing the server's fresh challenge;
- a device's published keys carry its own signature; a second device carries the signature of an
  existing device of the account over the new device's keys (the approval).

Device lists across nodes: every send checks the addressed devices against the account's
active devices, cached per node. With one node, an approval or a revocation drops the entry.
With several (``DeviceVersions``, Redis), a change also sets a new version of the account's list
once it is committed and tells the other nodes to drop theirs (``changed``, a bus signal); a
send asks the versions of its accounts (one round trip, batched) and uses a cached list only if
it was read under the current version. So a send on node B after a revocation on node A has
answered never accepts the revoked device, however late the signal. While Redis does not
answer, a cached list older than ``device_cache_fallback_s`` is read again from the store; and
one older than ``device_cache_max_age_s`` always is (a version bump lost to a Redis failure).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Protocol

from kluis.crypto.olm import verify_signature
from kluis.errors import (
    BadSignature,
    KluisError,
    LicenceInvalid,
    LinkInvalid,
    MalformedFrame,
    QuotaExceeded,
    RateLimited,
    UnknownAccount,
    UnknownDevice,
    UntrustedDevice,
)
from kluis.identity.chain import (
    account_id_for,
    check_certificate,
    check_device_keys,
    check_revocation,
)
from kluis.protocol import signing
from kluis.protocol.frames import DeviceKeys, DeviceRecord, PendingLink, Revocation
from kluis.server.config import Limits
from kluis.server.keys import check_signed_key
from kluis.server.store.protocol import Account, Store

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


def new_link_token() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(12))


def _certified(account_id: str, identity: str, record: DeviceRecord) -> None:
    """The identity's certificate over the device's canonical, self-signed keys."""
    try:
        check_certificate(account_id, identity, record)
    except UntrustedDevice as exc:
        raise BadSignature(exc.message) from exc


class DeviceVersions(Protocol):
    """Versions of each account's device list, shared by the nodes (``server/redis_state.py``)."""

    def versions(self, accounts: list[str]) -> Awaitable[list[str | None] | None]:
        """Each account's current version (None: none yet); None overall: unavailable."""
        ...

    async def bump_version(self, account: str) -> None:
        """A new version, after a committed change."""
        ...


_NO_VERSION = object()  # a cache entry read while the versions were unavailable


class Accounts:
    def __init__(
        self,
        store: Store,
        clock: Callable[[], float],
        limits: Limits,
        origin: str = "",
        *,
        versions: DeviceVersions | None = None,
        changed: Callable[[str], None] | None = None,
    ) -> None:
        self._store = store
        self._origin = origin  # what login signatures are bound to (signing.origin)
        self._clock = clock
        self._link_ttl_s = limits.link_ttl_s
        self._max_keys = limits.max_keys_per_upload
        self._max_links = limits.max_pending_links
        self._max_devices = limits.max_devices_per_account
        # The hot path of every send: each account's active device IDs, cached. An approval or
        # a revocation drops the entry before its store call and again after it, and bumps
        # ``_epoch``, so a read that was in flight across the change never fills the cache.
        self._device_ids: dict[str, frozenset[str]] = {}
        self._epoch = 0
        # Several nodes: the version each cached list was read under, and when.
        self.shared_versions = versions
        self._changed = changed
        self._read_under: dict[str, tuple[object, float]] = {}
        self._fallback_s = limits.device_cache_fallback_s
        self._max_age_s = limits.device_cache_max_age_s

    def _now(self) -> int:
        return int(self._clock())

    async def create_licences(self, count: int, days: int) -> list[str]:
        codes = [new_licence_code() for _ in range(count)]
        await self._store.add_licences([licence_hash(c) for c in codes], days, self._now())
        return codes

    def _check_login(self, device: str, nonce: bytes, sig: str) -> None:
        verify_signature(device, signing.challenge_message(nonce, device, self._origin), sig)

    async def register(
        self, licence: str, identity: str, record: DeviceRecord, nonce: bytes, sig: str
    ) -> Account:
        # The challenge first: existence is told only to the key's holder.
        self._check_login(record.keys.ed25519, nonce, sig)
        account_id = account_id_for(identity)
        _certified(account_id, identity, record)
        await self._check_unused(record.keys)
        if await self._store.account(account_id) is not None:
            raise BadSignature("this identity key already has an account")
        account = await self._store.register(
            licence_hash(licence), account_id, identity, record, self._now()
        )
        if account is None:
            raise LicenceInvalid("licence code is unknown or already redeemed")
        await self._store.seen(account.id, self._now() // 86_400)  # registering logs in
        return account

    async def _check_unused(self, keys: DeviceKeys) -> None:
        # One Curve25519 key, one device: sessions and sealed-sender claims name a device by it.
        if await self._store.device(keys.ed25519) is not None or await self._store.curve_in_use(
            keys.curve25519
        ):
            raise BadSignature("these device keys are already registered")

    async def authenticate(self, device_id: str, nonce: bytes, sig: str) -> Account:
        # One answer for an unknown device, a revoked one and a bad signature, after one
        # signature check in each case: before login, no one learns which keys are in use.
        stored = await self._store.device(device_id)
        key = device_id if stored is not None and not stored.revoked else _DECOY_KEY
        try:
            self._check_login(key, nonce, sig)
        except KluisError as exc:
            raise UnknownDevice(_AUTH_REFUSED) from exc
        if key is _DECOY_KEY:
            raise UnknownDevice(_AUTH_REFUSED)
        assert stored is not None
        account = await self._store.account(stored.account_id)
        if account is None:
            raise UnknownAccount("account is gone")
        # An expired account still logs in and receives; sending is refused (Subscriptions).
        await self._store.seen(account.id, self._now() // 86_400)  # the day only (admin console)
        return account

    async def account(self, account_id: str) -> Account:
        return await self._account(account_id)

    async def _account(self, account_id: str) -> Account:
        account = await self._store.account(account_id)
        if account is None:
            raise UnknownAccount(f"no account {account_id!r}")
        return account

    async def devices(self, account_id: str) -> tuple[str, list[DeviceRecord], list[Revocation]]:
        """The account's identity key, its active devices and the revocations of the others."""
        identity = (await self._account(account_id)).identity
        return (
            identity,
            await self._store.active_devices(account_id),
            await self._store.revocations(account_id),
        )

    def cached_device_ids(self, account_id: str) -> frozenset[str] | None:
        """The account's active device IDs if they are cached (no await on the hot path).
        One node only: with shared versions, use ``ask_versions`` and ``current_device_ids``."""
        return self._device_ids.get(account_id)

    async def device_ids(self, account_id: str) -> frozenset[str]:
        if self.shared_versions is not None:
            versions = self.ask_versions([account_id])
            return (await self.current_device_ids([account_id], versions))[0]
        ids = self._device_ids.get(account_id)
        if ids is None:
            ids = await self._read_device_ids(account_id, _NO_VERSION)
        return ids

    async def _read_device_ids(self, account_id: str, version: object) -> frozenset[str]:
        epoch = self._epoch
        await self._account(account_id)
        ids = frozenset(r.keys.ed25519 for r in await self._store.active_devices(account_id))
        if epoch == self._epoch:  # no device was added or revoked meanwhile
            self._device_ids[account_id] = ids
            if self.shared_versions is not None:
                self._read_under[account_id] = (version, self._clock())
        return ids

    def ask_versions(self, account_ids: list[str]) -> Awaitable[list[str | None] | None]:
        """Start reading the accounts' device-list versions (answered with other requests')."""
        assert self.shared_versions is not None
        return self.shared_versions.versions(account_ids)

    async def current_device_ids(
        self, account_ids: list[str], versions: Awaitable[list[str | None] | None]
    ) -> list[frozenset[str]]:
        """Each account's active devices, from the cache where it is current (several nodes)."""
        current = await versions
        out: list[frozenset[str]] = []
        for i, account_id in enumerate(account_ids):
            ids = self._device_ids.get(account_id)
            read = self._read_under.get(account_id)
            age = self._clock() - read[1] if read is not None else float("inf")
            if current is None:  # Redis unavailable: a recent list will do
                fresh = age < self._fallback_s
                version: object = _NO_VERSION
            else:
                # A bump lost to a Redis failure on the changing node: the age bounds that too.
                version = current[i]
                fresh = read is not None and read[0] == version and age < self._max_age_s
            if ids is None or not fresh:
                ids = await self._read_device_ids(account_id, version)
            out.append(ids)
        return out

    def invalidate(self, account_id: str) -> None:
        """Another node changed the account's devices: drop the cached list."""
        self._devices_changing(account_id)

    def _devices_changing(self, account_id: str) -> None:
        self._device_ids.pop(account_id, None)
        self._read_under.pop(account_id, None)
        self._epoch += 1

    async def _devices_changed(self, account_id: str) -> None:
        """After the store call: the local cache, the shared version, the other nodes."""
        self._devices_changing(account_id)
        if self.shared_versions is not None:
            await self.shared_versions.bump_version(account_id)
        if self._changed is not None:
            self._changed(account_id)

    async def request_link(self, link: PendingLink, nonce: bytes, sig: str) -> tuple[str, int]:
        # Cheapest first: caps and counts, then one signature, then the rest.
        keys = link.device
        if len(link.one_time_keys) > self._max_keys:
            raise QuotaExceeded(f"at most {self._max_keys} keys per upload")
        if await self._store.count_links(self._now()) >= self._max_links:
            raise RateLimited("too many device links are pending; try again in a few minutes")
        self._check_login(keys.ed25519, nonce, sig)
        await self._check_unused(keys)
        check_device_keys(keys)
        for k in [*link.one_time_keys, *([link.fallback_key] if link.fallback_key else [])]:
            check_signed_key(keys.ed25519, k)
        token, expires = new_link_token(), self._now() + self._link_ttl_s
        await self._store.put_link(token, link, expires)
        return token, expires

    async def link_keys(self, token: str) -> DeviceKeys:
        link = await self._store.link(token, self._now())
        if link is None:
            raise LinkInvalid("link code is unknown or expired")
        return link.device

    async def approve_link(self, account_id: str, token: str, record: DeviceRecord) -> None:
        """Admit the pending device of ``token`` once the account's identity certified it."""
        pending = await self.link_keys(token)
        if record.keys != pending:
            raise LinkInvalid("the certificate is not for the pending device")
        _certified(account_id, (await self._account(account_id)).identity, record)
        await self._check_unused(record.keys)
        self._devices_changing(account_id)
        try:
            if not await self._store.add_device(account_id, record, token, self._now()):
                raise LinkInvalid("link code was used meanwhile")
        finally:
            await self._devices_changed(account_id)

    async def check_room(self, account_id: str) -> None:
        """Refuse to link another device to a full account."""
        if len(await self.device_ids(account_id)) >= self._max_devices:
            raise QuotaExceeded(f"an account has at most {self._max_devices} devices")

    async def revoke(self, account_id: str, revocation: Revocation) -> None:
        """End a device of ``account_id``: signed by the account's identity or by the device."""
        stored = await self._store.device(revocation.device)
        if stored is None or stored.revoked or stored.account_id != account_id:
            raise UnknownDevice("no such device in this account")
        try:
            check_revocation(account_id, (await self._account(account_id)).identity, revocation)
        except MalformedFrame as exc:
            raise BadSignature("revocation is malformed") from exc
        self._devices_changing(account_id)
        try:
            await self._store.revoke_device(revocation.device, revocation)
        finally:
            await self._devices_changed(account_id)
