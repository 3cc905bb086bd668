"""The console's store on SQLite: its tables beside the server's own in the same database,
reached through ``SqliteStore.run_on_database`` (one connection, the store's worker thread).

The tables and their promises are those of ``store.py``; they are created on first use (``IF
NOT EXISTS``). The audit log's triggers refuse UPDATE and DELETE. Each method runs in one
transaction of the worker thread, so a TOTP step's conditional update cannot race.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar

from kluis.server.admin.store import (
    AccountRow,
    AdminUser,
    AuditEntry,
    LicenceCount,
    ResellerRow,
    Role,
    account_rows,
    audit_entries,
    reseller_rows,
    user_row,
)
from kluis.server.store.sqlite import SqliteDatabase, SqliteStore

_T = TypeVar("_T")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS admin_users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('admin', 'reseller')),
    password_hash TEXT NOT NULL,
    totp BLOB NOT NULL,
    totp_last_step INTEGER NOT NULL DEFAULT 0,
    quota INTEGER NOT NULL DEFAULT 0,
    issued INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS admin_sessions (
    token_hash BLOB PRIMARY KEY,
    name TEXT NOT NULL REFERENCES admin_users(name),
    expires_at INTEGER NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS admin_audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
)""",
    "CREATE TRIGGER IF NOT EXISTS admin_audit_no_update BEFORE UPDATE ON admin_audit "
    "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS admin_audit_no_delete BEFORE DELETE ON admin_audit "
    "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
)


def _user(row: tuple[object, ...] | None) -> AdminUser | None:
    if row is None:
        return None
    return user_row(*row)


_USER_COLUMNS = "name, role, password_hash, totp, quota, issued"


def _audit(db: sqlite3.Connection, now: int, actor: str, action: str, detail: str) -> None:
    db.execute(
        "INSERT INTO admin_audit(at, actor, action, detail) VALUES (?, ?, ?, ?)",
        (now, actor, action, detail),
    )


class SqliteAdminStore:
    """The console's persistence on a :class:`SqliteStore`'s database."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self._ready = False

    async def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """``fn`` in one transaction on the store's worker thread."""

        def run(db: SqliteDatabase) -> _T:
            with db.transaction() as conn:
                if not self._ready:
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    self._ready = True
                return fn(conn)

        return await self._store.run_on_database(run)

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
        def run(db: sqlite3.Connection) -> bool:
            try:
                db.execute(
                    "INSERT INTO admin_users(name, role, password_hash, totp, quota, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (name, role, password_hash, totp, quota, now),
                )
            except sqlite3.IntegrityError:
                return False
            detail = f"{role} {name}" + (f", quota {quota}" if role == "reseller" else "")
            _audit(db, now, actor, "create user", detail)
            return True

        return await self._call(run)

    async def user(self, name: str) -> AdminUser | None:
        def run(db: sqlite3.Connection) -> AdminUser | None:
            return _user(
                db.execute(
                    f"SELECT {_USER_COLUMNS} FROM admin_users WHERE name = ?", (name,)
                ).fetchone()
            )

        return await self._call(run)

    async def use_totp_step(self, name: str, step: int) -> bool:
        """Mark a TOTP step used; False if it (or a later one) was used already: no replay."""

        def run(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE admin_users SET totp_last_step = ? WHERE name = ? AND totp_last_step < ?",
                (step, name, step),
            )
            return cur.rowcount == 1

        return await self._call(run)

    async def start_session(self, token_hash: bytes, name: str, expires_at: int, now: int) -> None:
        def run(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM admin_sessions WHERE expires_at <= ?", (now,))
            db.execute(
                "INSERT INTO admin_sessions(token_hash, name, expires_at) VALUES (?, ?, ?)",
                (token_hash, name, expires_at),
            )
            _audit(db, now, name, "log in", "")

        await self._call(run)

    async def session_user(self, token_hash: bytes, now: int) -> AdminUser | None:
        def run(db: sqlite3.Connection) -> AdminUser | None:
            return _user(
                db.execute(
                    f"SELECT {', '.join('u.' + c for c in _USER_COLUMNS.split(', '))} "
                    "FROM admin_sessions s JOIN admin_users u ON u.name = s.name "
                    "WHERE s.token_hash = ? AND s.expires_at > ?",
                    (token_hash, now),
                ).fetchone()
            )

        return await self._call(run)

    async def end_session(self, token_hash: bytes, name: str, now: int) -> None:
        def run(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM admin_sessions WHERE token_hash = ?", (token_hash,))
            _audit(db, now, name, "log out", "")

        await self._call(run)

    async def audit(self, actor: str, action: str, detail: str, now: int) -> None:
        await self._call(lambda db: _audit(db, now, actor, action, detail))

    async def audit_log(self, actor: str | None, limit: int = 500) -> list[AuditEntry]:
        """Newest first; only ``actor``'s entries when given."""

        def run(db: sqlite3.Connection) -> list[AuditEntry]:
            rows = db.execute(
                "SELECT at, actor, action, detail FROM admin_audit "
                "WHERE ? IS NULL OR actor = ? ORDER BY seq DESC LIMIT ?",
                (actor, actor, limit),
            ).fetchall()
            return audit_entries(rows)

        return await self._call(run)

    async def audit_of(self, action: str, limit: int = 200) -> list[AuditEntry]:
        """The entries of one ``action`` (the sent announcements), newest first."""

        def run(db: sqlite3.Connection) -> list[AuditEntry]:
            rows = db.execute(
                "SELECT at, actor, action, detail FROM admin_audit "
                "WHERE action = ? ORDER BY seq DESC LIMIT ?",
                (action, limit),
            ).fetchall()
            return audit_entries(rows)

        return await self._call(run)

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

        def run(db: sqlite3.Connection) -> bool:
            n = len(code_hashes)
            if reseller is not None:
                cur = db.execute(
                    "UPDATE admin_users SET issued = issued + ? "
                    "WHERE name = ? AND role = 'reseller' AND issued + ? <= quota",
                    (n, reseller, n),
                )
                if cur.rowcount != 1:
                    return False
            db.executemany(
                "INSERT INTO licences(code_hash, days, created_at, reseller) VALUES (?, ?, ?, ?)",
                [(h, days, now, reseller) for h in code_hashes],
            )
            _audit(db, now, actor, "create licences", f"{n} codes of {days} days")
            return True

        return await self._call(run)

    async def licence_counts(self, reseller: str | None, everyone: bool) -> list[LicenceCount]:
        """Unredeemed codes by reseller and length: all of them (``everyone``) or one
        reseller's."""

        def run(db: sqlite3.Connection) -> list[LicenceCount]:
            rows = db.execute(
                "SELECT reseller, days, COUNT(*) FROM licences WHERE ? OR reseller IS ? "
                "GROUP BY reseller, days ORDER BY reseller, days",
                (everyone, reseller),
            ).fetchall()
            return [LicenceCount(r[0], int(r[1]), int(r[2])) for r in rows]

        return await self._call(run)

    async def accounts(
        self, reseller: str | None, everyone: bool, limit: int = 1000
    ) -> list[AccountRow]:
        def run(db: sqlite3.Connection) -> list[AccountRow]:
            rows = db.execute(
                "SELECT a.id, a.expires_at, (SELECT COUNT(*) FROM devices d "
                "WHERE d.account_id = a.id AND d.revoked = 0), a.last_seen_day, a.reseller, "
                "a.suspended, a.operator_wipe "
                "FROM accounts a WHERE ? OR a.reseller IS ? ORDER BY a.id LIMIT ?",
                (everyone, reseller, limit),
            ).fetchall()
            return account_rows(rows)

        return await self._call(run)

    async def resellers(self) -> list[ResellerRow]:
        def run(db: sqlite3.Connection) -> list[ResellerRow]:
            rows = db.execute(
                "SELECT u.name, u.quota, u.issued, (SELECT COUNT(*) FROM accounts a "
                "WHERE a.reseller = u.name) FROM admin_users u WHERE u.role = 'reseller' "
                "ORDER BY u.name"
            ).fetchall()
            return reseller_rows(rows)

        return await self._call(run)
