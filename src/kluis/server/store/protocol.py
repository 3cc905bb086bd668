"""What the server persists, as an async interface that every service depends on.

Theory of operation: the services (``accounts``, ``keys``, ``mailbox``) hold the rules; a store
only persists, and each of its methods is one atomic step (one transaction): a failure changes
nothing. Implementations: ``sqlite.SqliteStore`` (embedded, one worker thread); a PostgreSQL
store is to join them, and must pass the same suite, ``tests/store/``.

Envelopes are opaque bodies kept per device under a per-device sequence number (the wire id):
numbers grow by one per envelope of a device, in one transaction with the envelope, and are
never reused while the server runs (a counter, not the largest stored number, which falls when
envelopes are acknowledged). Nothing orders envelopes across devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kluis.protocol.frames import DeviceRecord, PendingLink, Revocation, SignedKey


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    created_at: int
    expires_at: int
    identity: str = ""
    suspended: bool = False  # by the operator: no login (server/operator/subscriptions.py)
    operator_wipe: bool = True  # the account's policy: the operator may order a wipe


@dataclass(frozen=True, slots=True)
class StoredDevice:
    account_id: str
    record: DeviceRecord
    revoked: bool


class Store(Protocol):
    """The server's persistence. Every method is atomic; none applies a rule of its own."""

    async def close(self) -> None: ...

    def footprint(self) -> list[Path]:
        """Every file this store keeps its data in, main file first, whether or not it exists
        right now: what a copy of the server's disk takes from the store (SQLite: the database,
        its WAL, its shared-memory index, a rollback journal). A store on a database server lists
        none. The seizure audit (``kluis.audit``) reads these files; the suite in
        ``tests/store/`` checks that the store writes nowhere else in its folder."""
        ...

    # ---- licences and accounts ----------------------------------------------------------------

    async def add_licences(
        self, code_hashes: Sequence[bytes], days: int, now: int, reseller: str | None = None
    ) -> None:
        """Store unredeemed codes' hashes; ``reseller`` names the reseller that created them
        (None: the operator). Redeeming one copies that name to the account, nothing else."""
        ...

    async def seen(self, account_id: str, day: int) -> None:
        """Record the day (days since the epoch) the account last logged in."""
        ...

    async def register(
        self, code_hash: bytes, account_id: str, identity: str, device: DeviceRecord, now: int
    ) -> Account | None:
        """Redeem the licence and create the account with its first device, atomically; None
        (and no change) when the licence is unknown or already redeemed."""
        ...

    async def account(self, account_id: str) -> Account | None: ...

    # ---- devices ------------------------------------------------------------------------------

    async def device(self, device_id: str) -> StoredDevice | None: ...

    async def active_devices(self, account_id: str) -> list[DeviceRecord]:
        """The account's devices that are not revoked, oldest first."""
        ...

    async def add_device(
        self, account_id: str, device: DeviceRecord, link_token: str, now: int
    ) -> bool:
        """Add an approved device with its link's keys, consuming the link; False if gone."""
        ...

    async def curve_in_use(self, curve: str) -> bool: ...

    async def count_devices(self, account_id: str) -> int: ...

    async def revocations(self, account_id: str) -> list[Revocation]: ...

    async def revoke_device(self, device_id: str, revocation: Revocation) -> None:
        """Revoke a device and drop everything held for it: keys and undelivered envelopes."""
        ...

    # ---- device links -------------------------------------------------------------------------

    async def put_link(self, token: str, link: PendingLink, expires_at: int) -> None: ...

    async def count_links(self, now: int) -> int: ...

    async def link(self, token: str, now: int) -> PendingLink | None: ...

    # ---- key directory ------------------------------------------------------------------------

    async def add_keys(
        self, device_id: str, one_time_keys: Sequence[SignedKey], fallback: SignedKey | None
    ) -> int:
        """Store keys (a known key ID is ignored); return the device's one-time key count."""
        ...

    async def count_one_time_keys(self, device_id: str) -> int: ...

    async def claim_key(self, device_id: str) -> tuple[SignedKey, bool] | None:
        """Hand out one unused one-time key, atomically; the fallback key (True) when none is
        left; None when the device published neither."""
        ...

    async def fallback_key(self, device_id: str) -> tuple[SignedKey, bool] | None: ...

    # ---- mailbox ------------------------------------------------------------------------------

    async def write_envelopes(
        self, insert: Sequence[tuple[str, int, bytes]], delete: Sequence[tuple[str, int]]
    ) -> list[int]:
        """In one transaction, store ``insert`` rows (device, expires_at, body) and delete
        ``delete`` rows (device, wire id): the mailbox's group commit. Returns the inserted
        envelopes' wire ids, in order."""
        ...

    async def envelopes_after(
        self, device_id: str, after_seq: int, now: int, limit: int, max_bytes: int | None = None
    ) -> list[tuple[int, bytes]]:
        """(wire id, body) of a device's live envelopes after ``after_seq``, in order: at most
        ``limit`` of them and ``max_bytes`` of bodies (the first one always)."""
        ...

    async def count_envelopes(self, device_id: str) -> int: ...

    async def envelope_bytes(self, device_id: str) -> int: ...

    async def sweep(self, now: int) -> tuple[int, int]:
        """Delete expired envelopes and device links; return how many of each."""
        ...

    async def maintenance(self) -> None:
        """Housekeeping the server runs about once a second (SQLite: fold the WAL when it
        holds what a copy of the data folder must not show). Cheap when there is nothing to
        do."""
        ...

    # ---- operator (server/operator/) ----------------------------------------------------------

    async def add_plan_licences(
        self, code_hashes: Sequence[bytes], days: int, plan: str, now: int
    ) -> None: ...

    async def renew(self, code_hash: bytes, account_id: str, now: int) -> int | None:
        """Redeem the licence to extend the account: its end moves to the later of ``now`` and
        its current end, plus the licence's days; the new end, or None (and no change) when the
        licence or the account is unknown."""
        ...

    async def set_account_flag(self, account_id: str, flag: str, value: bool) -> bool:
        """Set ``suspended`` or ``operator_wipe``; False when there is no such account."""
        ...

    async def all_active_devices(self) -> list[str]: ...

    async def put_wipe(self, device_id: str, order: bytes) -> None:
        """Keep a signed wipe order for the device (replacing an earlier one)."""
        ...

    async def wipe_order(self, device_id: str) -> bytes | None: ...
