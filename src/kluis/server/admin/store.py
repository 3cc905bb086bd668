"""What the admin console persists, as a protocol: console users, sessions and the audit log,
kept beside the server's own tables in the node's database.

Implementations: :class:`~kluis.server.admin.sqlite.SqliteAdminStore` (the SQLite store's own
database and worker thread) and :class:`~kluis.server.admin.postgres.PostgresAdminStore` (the
PostgreSQL store's pool, shared by every node). :func:`admin_store_for` picks the one that fits
a node's ``Store``. Both keep the same promises, which ``tests/test_admin_console.py`` runs
against each:

- each method is one transaction;
- ``admin_users``: name, role (admin or reseller), argon2id password hash, the TOTP secret
  encrypted under ``admin.key`` (credentials.py), the last TOTP step used, a reseller's quota
  and how many codes it has issued. :meth:`AdminStore.use_totp_step` is a single conditional
  update, so a step is used once even when two nodes race for it;
- ``admin_sessions``: SHA-256 of each live session token (never the token), its user and
  expiry: any node serves a session another node started;
- ``admin_audit``: who did what when, append-only, enforced by the database itself (triggers
  refuse UPDATE and DELETE); it never holds a password, code, secret or token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from kluis.server.store.protocol import Store

Role = Literal["admin", "reseller"]


@dataclass(frozen=True, slots=True)
class AdminUser:
    name: str
    role: Role
    password_hash: str
    totp: bytes
    quota: int
    issued: int


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: int
    actor: str
    action: str
    detail: str


@dataclass(frozen=True, slots=True)
class AccountRow:
    id: str
    expires_at: int
    devices: int
    last_seen_day: int | None
    reseller: str | None
    suspended: bool = False
    operator_wipe: bool = True  # the account's policy lets the operator wipe its devices


@dataclass(frozen=True, slots=True)
class LicenceCount:
    reseller: str | None
    days: int
    count: int


@dataclass(frozen=True, slots=True)
class ResellerRow:
    name: str
    quota: int
    issued: int
    accounts: int


# Rows as both drivers give them (sqlite3 tuples, asyncpg Records), in the columns the stores'
# queries select, to records: written once for both.


def audit_entries(rows: Iterable[Sequence[Any]]) -> list[AuditEntry]:
    """(at, actor, action, detail) rows."""
    return [AuditEntry(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]


def account_rows(rows: Iterable[Sequence[Any]]) -> list[AccountRow]:
    """(id, expires_at, live devices, last_seen_day, reseller, suspended, operator_wipe) rows."""
    return [
        AccountRow(
            str(r[0]),
            int(r[1]),
            int(r[2]),
            None if r[3] is None else int(r[3]),
            r[4],
            bool(r[5]),
            bool(r[6]),
        )
        for r in rows
    ]


def reseller_rows(rows: Iterable[Sequence[Any]]) -> list[ResellerRow]:
    """(name, quota, issued, accounts) rows."""
    return [ResellerRow(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in rows]


def user_row(
    name: object, role: object, password_hash: object, totp: object, quota: object, issued: object
) -> AdminUser:
    """An :class:`AdminUser` from the driver's values (the columns of ``USER_COLUMNS``)."""
    if role != "admin" and role != "reseller":
        raise ValueError(f"admin_users holds an unknown role {role!r}")
    if not isinstance(totp, bytes | bytearray | memoryview):
        raise ValueError("admin_users.totp is not bytes")
    assert isinstance(quota, int) and isinstance(issued, int)
    return AdminUser(str(name), role, str(password_hash), bytes(totp), quota, issued)


USER_COLUMNS = ("name", "role", "password_hash", "totp", "quota", "issued")


class AdminStore(Protocol):
    """The console's persistence; every method is one transaction."""

    async def create_user(
        self,
        name: str,
        role: Role,
        password_hash: str,
        totp: bytes,
        quota: int,
        now: int,
        actor: str,
    ) -> bool:
        """Add a user and audit it; False (and no change) if the name is taken."""
        ...

    async def user(self, name: str) -> AdminUser | None: ...

    async def use_totp_step(self, name: str, step: int) -> bool:
        """Mark a TOTP step used; False if it (or a later one) was used already: no replay."""
        ...

    async def start_session(
        self, token_hash: bytes, name: str, expires_at: int, now: int
    ) -> None: ...

    async def session_user(self, token_hash: bytes, now: int) -> AdminUser | None: ...

    async def end_session(self, token_hash: bytes, name: str, now: int) -> None: ...

    async def audit(self, actor: str, action: str, detail: str, now: int) -> None: ...

    async def audit_log(self, actor: str | None, limit: int = 500) -> list[AuditEntry]:
        """Newest first; only ``actor``'s entries when given."""
        ...

    async def audit_of(self, action: str, limit: int = 200) -> list[AuditEntry]:
        """The entries of one ``action`` (the sent announcements), newest first."""
        ...

    async def issue_licences(
        self,
        code_hashes: list[bytes],
        days: int,
        now: int,
        actor: str,
        reseller: str | None,
    ) -> bool:
        """Store new codes and audit it, atomically; for a reseller only within its quota
        (False, and no change, beyond it)."""
        ...

    async def licence_counts(self, reseller: str | None, everyone: bool) -> list[LicenceCount]:
        """Unredeemed codes by reseller (no reseller first) and length: all of them
        (``everyone``) or one reseller's."""
        ...

    async def accounts(
        self, reseller: str | None, everyone: bool, limit: int = 1000
    ) -> list[AccountRow]: ...

    async def resellers(self) -> list[ResellerRow]: ...


def admin_store_for(store: Store) -> AdminStore | None:
    """The console's store beside ``store``'s tables, or None for a store it cannot live in."""
    # Imported here: each implementation imports this module for the rows above.
    from kluis.server.admin.postgres import PostgresAdminStore
    from kluis.server.admin.sqlite import SqliteAdminStore
    from kluis.server.store.postgres import PostgresStore
    from kluis.server.store.sqlite import SqliteStore

    if isinstance(store, SqliteStore):
        return SqliteAdminStore(store)
    if isinstance(store, PostgresStore):
        return PostgresAdminStore(store)
    return None
