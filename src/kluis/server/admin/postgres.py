"""The console's store on PostgreSQL: its tables beside the server's own in the same database,
through the :class:`PostgresStore`'s pool, so that every node of a deployment shares them.

Theory of operation:
- Schema: versioned migrations in ``ADMIN_MIGRATIONS``, recorded in ``admin_schema_version``
  and applied under an advisory lock of their own, apart from the store's ``MIGRATIONS`` (the
  two lists grow independently). They run at the first call, after the store's: the console's
  queries read ``licences`` and ``accounts``.
- Each method is one transaction at READ COMMITTED. A login's TOTP step is a single
  ``UPDATE ... WHERE totp_last_step < step``: a second node updating the same row waits for the
  first to commit, re-checks the condition and updates nothing, so a code is used once in the
  whole deployment. A reseller's quota is checked the same way (``issued + n <= quota``).
- Sessions are rows keyed by the SHA-256 of their token: a session started on one node is
  served by all of them. The login throttles are not here: they stay in each node's memory
  (``console.py``).
- The audit log is append-only in the database: triggers refuse UPDATE, DELETE and TRUNCATE
  whoever asks. A superuser can still drop the triggers; a deployment that wants more gives
  the nodes a role without that right (docs/architecture.md).

The driver is not imported here (``store/postgres.py`` is its one boundary): the pool is used
through its query methods, and a taken name is found with ``ON CONFLICT DO NOTHING``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from kluis.server.admin.store import (
    USER_COLUMNS,
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
from kluis.server.store.postgres import PostgresStore

# Any constant other than the store's: serialises the console's migrations across nodes.
_MIGRATION_LOCK = 0x6B6C75697361646D  # "kluisadm"

ADMIN_MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
CREATE TABLE admin_users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('admin', 'reseller')),
    password_hash TEXT NOT NULL,
    totp BYTEA NOT NULL,
    totp_last_step BIGINT NOT NULL DEFAULT 0,
    quota BIGINT NOT NULL DEFAULT 0,
    issued BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
CREATE TABLE admin_sessions (
    token_hash BYTEA PRIMARY KEY CHECK (octet_length(token_hash) = 32),
    name TEXT NOT NULL REFERENCES admin_users(name),
    expires_at BIGINT NOT NULL
);
CREATE INDEX admin_sessions_by_expiry ON admin_sessions(expires_at);
CREATE TABLE admin_audit (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX admin_audit_by_action ON admin_audit(action, seq);
CREATE FUNCTION admin_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only' USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER admin_audit_no_change BEFORE UPDATE OR DELETE ON admin_audit
    FOR EACH ROW EXECUTE FUNCTION admin_audit_append_only();
CREATE TRIGGER admin_audit_no_truncate BEFORE TRUNCATE ON admin_audit
    FOR EACH STATEMENT EXECUTE FUNCTION admin_audit_append_only();
""",
    ),
)

_USER = ", ".join(USER_COLUMNS)
_SESSION_USER = ", ".join("u." + c for c in USER_COLUMNS)


async def migrate(conn: Any) -> int:
    """Apply the console migrations ``conn``'s database lacks, in one transaction; the version
    after."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS admin_schema_version "
            "(version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)"
        )
        current = int(
            await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM admin_schema_version")
        )
        for version, sql in ADMIN_MIGRATIONS:
            if version > current:
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO admin_schema_version(version, applied_at) VALUES ($1, $2)",
                    version,
                    int(time.time()),
                )
                current = version
    return current


def _user(row: Any) -> AdminUser | None:
    return None if row is None else user_row(*row)


async def _audit(conn: Any, now: int, actor: str, action: str, detail: str) -> None:
    await conn.execute(
        "INSERT INTO admin_audit(at, actor, action, detail) VALUES ($1, $2, $3, $4)",
        now,
        actor,
        action,
        detail,
    )


class PostgresAdminStore:
    """The console's persistence in a :class:`PostgresStore`'s database."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self._ready = False
        self._migrating = asyncio.Lock()

    async def _pool(self) -> Any:
        pool = await self._store.connection_pool()  # the store's own migrations ran first
        if not self._ready:
            async with self._migrating:
                if not self._ready:
                    async with pool.acquire() as conn:
                        await migrate(conn)
                    self._ready = True
        return pool

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
        pool = await self._pool()
        async with pool.acquire() as conn, conn.transaction():
            added = await conn.fetchval(
                "INSERT INTO admin_users(name, role, password_hash, totp, quota, created_at) "
                "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING RETURNING name",
                name,
                role,
                password_hash,
                totp,
                quota,
                now,
            )
            if added is None:
                return False
            detail = f"{role} {name}" + (f", quota {quota}" if role == "reseller" else "")
            await _audit(conn, now, actor, "create user", detail)
        return True

    async def user(self, name: str) -> AdminUser | None:
        pool = await self._pool()
        return _user(await pool.fetchrow(f"SELECT {_USER} FROM admin_users WHERE name = $1", name))

    async def use_totp_step(self, name: str, step: int) -> bool:
        pool = await self._pool()
        used = await pool.fetchval(
            "UPDATE admin_users SET totp_last_step = $2 WHERE name = $1 AND totp_last_step < $2 "
            "RETURNING name",
            name,
            step,
        )
        return used is not None

    async def start_session(self, token_hash: bytes, name: str, expires_at: int, now: int) -> None:
        pool = await self._pool()
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM admin_sessions WHERE expires_at <= $1", now)
            await conn.execute(
                "INSERT INTO admin_sessions(token_hash, name, expires_at) VALUES ($1, $2, $3)",
                token_hash,
                name,
                expires_at,
            )
            await _audit(conn, now, name, "log in", "")

    async def session_user(self, token_hash: bytes, now: int) -> AdminUser | None:
        pool = await self._pool()
        row = await pool.fetchrow(
            f"SELECT {_SESSION_USER} FROM admin_sessions s JOIN admin_users u ON u.name = s.name "
            "WHERE s.token_hash = $1 AND s.expires_at > $2",
            token_hash,
            now,
        )
        return _user(row)

    async def end_session(self, token_hash: bytes, name: str, now: int) -> None:
        pool = await self._pool()
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM admin_sessions WHERE token_hash = $1", token_hash)
            await _audit(conn, now, name, "log out", "")

    async def audit(self, actor: str, action: str, detail: str, now: int) -> None:
        pool = await self._pool()
        async with pool.acquire() as conn:
            await _audit(conn, now, actor, action, detail)

    async def audit_log(self, actor: str | None, limit: int = 500) -> list[AuditEntry]:
        pool = await self._pool()
        rows = await pool.fetch(
            "SELECT at, actor, action, detail FROM admin_audit "
            "WHERE $1::text IS NULL OR actor = $1 ORDER BY seq DESC LIMIT $2",
            actor,
            limit,
        )
        return audit_entries(rows)

    async def audit_of(self, action: str, limit: int = 200) -> list[AuditEntry]:
        pool = await self._pool()
        rows = await pool.fetch(
            "SELECT at, actor, action, detail FROM admin_audit "
            "WHERE action = $1 ORDER BY seq DESC LIMIT $2",
            action,
            limit,
        )
        return audit_entries(rows)

    async def issue_licences(
        self,
        code_hashes: list[bytes],
        days: int,
        now: int,
        actor: str,
        reseller: str | None,
    ) -> bool:
        pool = await self._pool()
        n = len(code_hashes)
        async with pool.acquire() as conn, conn.transaction():
            if reseller is not None:
                # The row lock makes the check and the count one step for concurrent issuers.
                counted = await conn.fetchval(
                    "UPDATE admin_users SET issued = issued + $2 "
                    "WHERE name = $1 AND role = 'reseller' AND issued + $2 <= quota "
                    "RETURNING name",
                    reseller,
                    n,
                )
                if counted is None:
                    return False
            await conn.execute(
                "INSERT INTO licences(code_hash, days, created_at, reseller) "
                "SELECT h, $2, $3, $4 FROM unnest($1::bytea[]) AS t(h)",
                code_hashes,
                days,
                now,
                reseller,
            )
            await _audit(conn, now, actor, "create licences", f"{n} codes of {days} days")
        return True

    async def licence_counts(self, reseller: str | None, everyone: bool) -> list[LicenceCount]:
        pool = await self._pool()
        # NULLS FIRST and the C collation: the order SQLite gives.
        rows = await pool.fetch(
            "SELECT reseller, days, COUNT(*) FROM licences "
            "WHERE $1 OR reseller IS NOT DISTINCT FROM $2::text GROUP BY reseller, days "
            'ORDER BY reseller COLLATE "C" NULLS FIRST, days',
            everyone,
            reseller,
        )
        return [LicenceCount(r[0], int(r[1]), int(r[2])) for r in rows]

    async def accounts(
        self, reseller: str | None, everyone: bool, limit: int = 1000
    ) -> list[AccountRow]:
        pool = await self._pool()
        rows = await pool.fetch(
            "SELECT a.id, a.expires_at, (SELECT COUNT(*) FROM devices d "
            "WHERE d.account_id = a.id AND NOT d.revoked), a.last_seen_day, a.reseller, "
            "a.suspended, a.operator_wipe FROM accounts a "
            'WHERE $1 OR a.reseller IS NOT DISTINCT FROM $2::text ORDER BY a.id COLLATE "C" '
            "LIMIT $3",
            everyone,
            reseller,
            limit,
        )
        return account_rows(rows)

    async def resellers(self) -> list[ResellerRow]:
        pool = await self._pool()
        rows = await pool.fetch(
            "SELECT u.name, u.quota, u.issued, (SELECT COUNT(*) FROM accounts a "
            "WHERE a.reseller = u.name) FROM admin_users u WHERE u.role = 'reseller' "
            'ORDER BY u.name COLLATE "C"'
        )
        return reseller_rows(rows)
