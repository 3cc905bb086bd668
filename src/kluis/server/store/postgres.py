"""Server persistence on PostgreSQL (asyncpg), the only module that imports the driver.

:class:`PostgresStore` implements the async ``Store`` protocol (``protocol.py``) over a
connection pool, with the semantics of ``sqlite.SqliteStore`` (the suite in ``tests/store/``
runs both). The pool opens, and the migrations run, at the first call or at :meth:`open`, which
``kluis serve`` awaits at start-up so that a wrong URL fails there.

Schema: versioned migrations in ``MIGRATIONS``, applied in order under an advisory lock (several
nodes may start at once) and recorded in ``schema_version``; migration 1 creates every table.
The tables match SQLite's: licences (SHA-256 of unredeemed codes, the row deleted on
redemption), accounts, devices (msgpack records, a server-wide unique curve key), one-time and
fallback keys, links, envelopes keyed by (device, per-device sequence) and ``device_seq``, each
device's last sequence number, starting at a random offset below 2**40.

Concurrency (several connections, later several nodes): every method is one transaction at READ
COMMITTED. A key claim locks the key it deletes and skips keys other claims hold (``SKIP
LOCKED``), so a key goes out once and a claim never falls back to the fallback key while a
one-time key is free. A group commit creates missing counter rows (``ON CONFLICT DO NOTHING``
waits for a concurrent creator), then locks and bumps them in device order, so two commits
never deadlock and numbers have no gap and no repeat.

Seizure (SECURITY.md, "On PostgreSQL"): PostgreSQL keeps dead row versions and WAL records
for an unbounded time, so what it must not show is never given to it in readable form
(``sealing.py``): envelope bodies are sealed under per-epoch storage keys (``storage_keys``,
wrapped under a key-encryption key from the nodes' key file, deleted once their epoch has no
envelope left, re-wrapped when the KEK version changes); envelopes and counters are kept under
mailbox names and licences under tags (HMACs under the file's index key), so no row and no
transaction names a device beside an envelope, and no row names a code. Migration 3 sets
aggressive per-table autovacuum on the secret tables; :meth:`maintenance` destroys keys,
rotates (both in ``pg_keys.py``) and vacuums.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from kluis.errors import StorageKeyError
from kluis.protocol.frames import DeviceRecord, PendingLink, Revocation, SignedKey
from kluis.server.store.pg_keys import StorageKeys
from kluis.server.store.protocol import Account, StoredDevice
from kluis.server.store.sealing import (
    DEFAULT_PERIOD_S,
    NONCE_BYTES,
    KeyRing,
    epoch_of,
    open_body,
    seal_body,
)

_SEQ_ORIGIN = 1 << 40
# Any constant: serialises migrations of nodes starting together (pg_advisory_xact_lock).
_MIGRATION_LOCK = 0x6B6C756973

# Per-table autovacuum: after this many dead rows whatever the table's size (the default waits
# for 20% of the table), and without cost-based sleeping.
_VACUUM_SOON = (
    "autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 50, "
    "autovacuum_vacuum_cost_delay = 0"
)

MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
CREATE TABLE licences (
    code_hash BYTEA PRIMARY KEY,
    days INTEGER NOT NULL,
    created_at BIGINT NOT NULL,
    reseller TEXT
);
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    identity TEXT NOT NULL DEFAULT '',
    reseller TEXT,
    last_seen_day INTEGER
);
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    record BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    revoked BOOLEAN NOT NULL DEFAULT false,
    curve TEXT UNIQUE,
    revocation BYTEA
);
CREATE INDEX devices_by_account ON devices(account_id);
CREATE TABLE one_time_keys (
    device_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key BYTEA NOT NULL,
    PRIMARY KEY (device_id, key_id)
);
CREATE TABLE fallback_keys (
    device_id TEXT PRIMARY KEY,
    key BYTEA NOT NULL
);
CREATE TABLE links (
    token TEXT PRIMARY KEY,
    keys BYTEA NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX links_by_expiry ON links(expires_at);
CREATE TABLE envelopes (
    device_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX envelopes_by_expiry ON envelopes(expires_at);
CREATE TABLE device_seq (
    device_id TEXT PRIMARY KEY,
    last BIGINT NOT NULL
);
""",
    ),
    (
        2,
        """
ALTER TABLE licences ADD COLUMN plan TEXT NOT NULL DEFAULT '';
ALTER TABLE accounts ADD COLUMN suspended BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE accounts ADD COLUMN operator_wipe BOOLEAN NOT NULL DEFAULT TRUE;
CREATE TABLE wipes (
    device_id TEXT PRIMARY KEY,
    wipe_order BYTEA NOT NULL
);
""",
    ),
    (
        3,
        # Storage keys (sealing.py): envelope bodies sealed under per-epoch keys, wrapped under
        # a key-encryption key kept in a file on the nodes; ``storage_check`` lets a node with
        # another key file refuse to start. Envelopes stored before this migration keep a NULL
        # epoch (plain body) until delivered or expired. Vacuum policy: secret tables are
        # vacuumed after a handful of dead rows, not after a fraction of the table.
        f"""
CREATE TABLE storage_keys (
    epoch BIGINT PRIMARY KEY,
    kek_version BIGINT NOT NULL,
    wrapped BYTEA NOT NULL
) WITH (fillfactor = 50, {_VACUUM_SOON});
CREATE TABLE storage_check (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    kek_version BIGINT NOT NULL,
    sealed BYTEA NOT NULL
);
ALTER TABLE envelopes ADD COLUMN epoch BIGINT;
ALTER TABLE envelopes ADD COLUMN size INTEGER;
UPDATE envelopes SET size = octet_length(body);
ALTER TABLE envelopes ALTER COLUMN size SET NOT NULL;
CREATE INDEX envelopes_by_epoch ON envelopes(epoch);
ALTER TABLE envelopes SET ({_VACUUM_SOON}, toast.autovacuum_vacuum_scale_factor = 0,
    toast.autovacuum_vacuum_threshold = 50);
ALTER TABLE licences SET ({_VACUUM_SOON});
ALTER TABLE one_time_keys SET ({_VACUUM_SOON});
""",
    ),
)

_enc = msgspec.msgpack.Encoder()
_record_dec = msgspec.msgpack.Decoder(DeviceRecord)
_key_dec = msgspec.msgpack.Decoder(SignedKey)
_link_dec = msgspec.msgpack.Decoder(PendingLink)
_revocation_dec = msgspec.msgpack.Decoder(Revocation)


def _rowcount(status: str) -> int:
    """The row count of a command tag such as ``DELETE 3``."""
    return int(status.rsplit(" ", 1)[-1])


async def migrate(conn: Any) -> int:
    """Apply the migrations ``conn``'s database lacks, in one transaction; the version after."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version "
            "(version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)"
        )
        current = int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
        for version, sql in MIGRATIONS:
            if version > current:
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_version(version, applied_at) VALUES ($1, $2)",
                    version,
                    int(time.time()),
                )
                current = version
    return current


async def migrate_database(dsn: str) -> tuple[int, int]:
    """Bring the database at ``dsn`` to the latest schema (``kluis migrate``); its schema
    version before and after. A database that cannot be reached is a ConnectionError."""
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise ConnectionError(f"cannot reach the PostgreSQL database: {exc}") from exc
    try:
        before = 0
        if await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL"):
            before = int(
                await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            )
        return before, await migrate(conn)
    finally:
        await conn.close()


class PostgresStore:
    """The ``Store`` on PostgreSQL at ``dsn`` (``postgresql://user@host:port/database``)."""

    def __init__(
        self,
        dsn: str,
        *,
        min_connections: int = 1,
        max_connections: int = 10,
        seq_origin: Callable[[], int] = lambda: secrets.randbelow(_SEQ_ORIGIN),
        vacuum_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        key_file: Path | None = None,
        key_period_s: int = DEFAULT_PERIOD_S,
        key_sweep_interval_s: float = 10.0,
        wall_clock: Callable[[], float] = time.time,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.dsn = dsn
        self._sizes = (min_connections, max_connections)
        self._seq_origin = seq_origin
        self._pool: Any = None
        self._opening = asyncio.Lock()
        self._vacuum_interval_s = vacuum_interval_s
        self._clock = clock
        self._deleted = False  # envelopes deleted since the last vacuum
        self._vacuumed_at = float("-inf")
        # Storage keys (pg_keys.py): the key file is read at open() or at the first call
        # that needs it.
        self._key_file = key_file
        self._keys = (
            None
            if key_file is None
            else StorageKeys(key_file, period_s=key_period_s, wall_clock=wall_clock, random=random)
        )
        self._key_sweep_interval_s = key_sweep_interval_s
        self._random = random
        self._destroy_due = False  # envelopes deleted: an epoch may have emptied
        self._keys_swept_at = float("-inf")
        self._keys_changed = False  # storage_keys rows deleted or re-wrapped since the vacuum

    async def open(self) -> None:
        """Connect, migrate and read the storage key file (idempotent): every other method
        does what it needs of this first."""
        await self._connect()
        await self._keyring()

    async def _keyring(self) -> KeyRing:
        if self._keys is None:
            raise StorageKeyError("the PostgreSQL store needs a storage key file")
        return await self._keys.load(await self._connect())

    async def connection_pool(self) -> Any:
        """The store's asyncpg pool, connected and migrated: for the admin console's tables
        (``server/admin/postgres.py``), which live in the same database."""
        return await self._connect()

    async def _connect(self) -> Any:
        if self._pool is not None:
            return self._pool
        async with self._opening:
            if self._pool is None:
                self._pool = await self._open_pool()
        return self._pool

    async def _open_pool(self) -> Any:
        # The one place a connection failure is translated (the URL may hold a password: it is
        # not repeated in the message).
        try:
            pool = await asyncpg.create_pool(
                self.dsn, min_size=self._sizes[0], max_size=self._sizes[1], timeout=10
            )
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise ConnectionError(f"cannot reach the PostgreSQL database: {exc}") from exc
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
        except BaseException:
            await pool.close()
            raise
        return pool

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def footprint(self) -> list[Path]:
        """The storage key file only: the data directory belongs to the PostgreSQL server, not
        to this process (``kluis audit-storage --pgdata`` reads it; SECURITY.md says what a
        copy of it holds)."""
        return [] if self._key_file is None else [self._key_file.absolute()]

    # ---- licences and accounts ----------------------------------------------------------------

    async def add_licences(
        self, code_hashes: Sequence[bytes], days: int, now: int, reseller: str | None = None
    ) -> None:
        pool = await self._connect()
        ring = await self._keyring()
        await pool.execute(
            "INSERT INTO licences(code_hash, days, created_at, reseller) "
            "SELECT h, $2, $3, $4 FROM unnest($1::bytea[]) AS t(h)",
            [ring.licence_tag(h) for h in code_hashes],
            days,
            now,
            reseller,
        )

    async def seen(self, account_id: str, day: int) -> None:
        pool = await self._connect()
        await pool.execute(
            "UPDATE accounts SET last_seen_day = $2 WHERE id = $1 "
            "AND last_seen_day IS DISTINCT FROM $2",
            account_id,
            day,
        )

    async def register(
        self, code_hash: bytes, account_id: str, identity: str, device: DeviceRecord, now: int
    ) -> Account | None:
        pool = await self._connect()
        tag = (await self._keyring()).licence_tag(code_hash)
        async with pool.acquire() as conn, conn.transaction():
            # The redeemed code's row goes (see sqlite.py); its dead version keeps only the
            # tag, which nobody without the key file can match to a code.
            row = await conn.fetchrow(
                "DELETE FROM licences WHERE code_hash = $1 RETURNING days, reseller", tag
            )
            if row is None:
                return None
            account = Account(account_id, now, now + int(row["days"]) * 86_400, identity)
            await conn.execute(
                "INSERT INTO accounts(id, created_at, expires_at, identity, reseller) "
                "VALUES ($1, $2, $3, $4, $5)",
                account.id,
                account.created_at,
                account.expires_at,
                identity,
                row["reseller"],
            )
            await _insert_device(conn, account_id, device, now)
        return account

    async def account(self, account_id: str) -> Account | None:
        pool = await self._connect()
        row = await pool.fetchrow(
            "SELECT id, created_at, expires_at, identity, suspended, operator_wipe"
            " FROM accounts WHERE id = $1",
            account_id,
        )
        if row is None:
            return None
        return Account(
            str(row[0]), int(row[1]), int(row[2]), str(row[3]), bool(row[4]), bool(row[5])
        )

    # ---- operator (subscriptions, wipes: server/operator/) ------------------------------------

    async def add_plan_licences(
        self, code_hashes: Sequence[bytes], days: int, plan: str, now: int
    ) -> None:
        pool = await self._connect()
        ring = await self._keyring()
        await pool.execute(
            "INSERT INTO licences(code_hash, days, created_at, plan) "
            "SELECT h, $2, $3, $4 FROM unnest($1::bytea[]) AS t(h)",
            [ring.licence_tag(h) for h in code_hashes],
            days,
            now,
            plan,
        )

    async def renew(self, code_hash: bytes, account_id: str, now: int) -> int | None:
        pool = await self._connect()
        tag = (await self._keyring()).licence_tag(code_hash)
        async with pool.acquire() as conn, conn.transaction():
            if await conn.fetchval("SELECT 1 FROM accounts WHERE id = $1", account_id) is None:
                return None
            days = await conn.fetchval(
                "DELETE FROM licences WHERE code_hash = $1 RETURNING days", tag
            )
            if days is None:
                return None
            expires = await conn.fetchval(
                "UPDATE accounts SET expires_at = GREATEST(expires_at, $2) + $3 WHERE id = $1"
                " RETURNING expires_at",
                account_id,
                now,
                int(days) * 86_400,
            )
        return int(expires)

    async def set_account_flag(self, account_id: str, flag: str, value: bool) -> bool:
        if flag not in ("suspended", "operator_wipe"):
            raise ValueError(flag)
        pool = await self._connect()
        status = await pool.execute(
            f"UPDATE accounts SET {flag} = $2 WHERE id = $1", account_id, value
        )
        return _rowcount(status) > 0

    async def all_active_devices(self) -> list[str]:
        pool = await self._connect()
        rows = await pool.fetch("SELECT id FROM devices WHERE NOT revoked")
        return [str(r[0]) for r in rows]

    async def put_wipe(self, device_id: str, order: bytes) -> None:
        pool = await self._connect()
        await pool.execute(
            "INSERT INTO wipes(device_id, wipe_order) VALUES ($1, $2)"
            " ON CONFLICT (device_id) DO UPDATE SET wipe_order = EXCLUDED.wipe_order",
            device_id,
            order,
        )

    async def wipe_order(self, device_id: str) -> bytes | None:
        pool = await self._connect()
        order = await pool.fetchval("SELECT wipe_order FROM wipes WHERE device_id = $1", device_id)
        return None if order is None else bytes(order)

    # ---- devices ------------------------------------------------------------------------------

    async def device(self, device_id: str) -> StoredDevice | None:
        pool = await self._connect()
        row = await pool.fetchrow(
            "SELECT account_id, record, revoked FROM devices WHERE id = $1", device_id
        )
        if row is None:
            return None
        return StoredDevice(str(row[0]), _record_dec.decode(row[1]), bool(row[2]))

    async def active_devices(self, account_id: str) -> list[DeviceRecord]:
        pool = await self._connect()
        rows = await pool.fetch(
            "SELECT record FROM devices WHERE account_id = $1 AND NOT revoked "
            "ORDER BY created_at, id",
            account_id,
        )
        return [_record_dec.decode(r[0]) for r in rows]

    async def add_device(
        self, account_id: str, device: DeviceRecord, link_token: str, now: int
    ) -> bool:
        pool = await self._connect()
        async with pool.acquire() as conn, conn.transaction():
            keys = await conn.fetchval(
                "DELETE FROM links WHERE token = $1 RETURNING keys", link_token
            )
            if keys is None:
                return False
            link = _link_dec.decode(keys)
            await _insert_device(conn, account_id, device, now)
            await _add_keys(conn, device.keys.ed25519, link.one_time_keys, link.fallback_key)
        return True

    async def curve_in_use(self, curve: str) -> bool:
        pool = await self._connect()
        return await pool.fetchval("SELECT 1 FROM devices WHERE curve = $1", curve) is not None

    async def count_devices(self, account_id: str) -> int:
        pool = await self._connect()
        return int(
            await pool.fetchval(
                "SELECT COUNT(*) FROM devices WHERE account_id = $1 AND NOT revoked", account_id
            )
        )

    async def revocations(self, account_id: str) -> list[Revocation]:
        pool = await self._connect()
        rows = await pool.fetch(
            "SELECT revocation FROM devices WHERE account_id = $1 AND revoked "
            "AND revocation IS NOT NULL ORDER BY created_at, id",
            account_id,
        )
        return [_revocation_dec.decode(r[0]) for r in rows]

    async def revoke_device(self, device_id: str, revocation: Revocation) -> None:
        pool = await self._connect()
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE devices SET revoked = true, revocation = $2 WHERE id = $1",
                device_id,
                _enc.encode(revocation),
            )
            for table in ("one_time_keys", "fallback_keys"):
                await conn.execute(f"DELETE FROM {table} WHERE device_id = $1", device_id)
        # Its mailbox goes in a transaction of its own: one that also changed the device's row
        # would tie the device to its mailbox name in the files (the transaction id of the
        # dead rows). Should this one fail, the envelopes stay undeliverable until they expire.
        mailbox = (await self._keyring()).mailbox(device_id)
        async with pool.acquire() as conn, conn.transaction():
            for table in ("device_seq", "envelopes"):
                await conn.execute(f"DELETE FROM {table} WHERE device_id = $1", mailbox)
        self._deleted = self._destroy_due = True

    # ---- device links -------------------------------------------------------------------------

    async def put_link(self, token: str, link: PendingLink, expires_at: int) -> None:
        pool = await self._connect()
        await pool.execute(
            "INSERT INTO links(token, keys, expires_at) VALUES ($1, $2, $3)",
            token,
            _enc.encode(link),
            expires_at,
        )

    async def count_links(self, now: int) -> int:
        pool = await self._connect()
        return int(await pool.fetchval("SELECT COUNT(*) FROM links WHERE expires_at > $1", now))

    async def link(self, token: str, now: int) -> PendingLink | None:
        pool = await self._connect()
        keys = await pool.fetchval(
            "SELECT keys FROM links WHERE token = $1 AND expires_at > $2", token, now
        )
        return _link_dec.decode(keys) if keys is not None else None

    # ---- key directory ------------------------------------------------------------------------

    async def add_keys(
        self, device_id: str, one_time_keys: Sequence[SignedKey], fallback: SignedKey | None
    ) -> int:
        pool = await self._connect()
        async with pool.acquire() as conn:
            async with conn.transaction():
                await _add_keys(conn, device_id, one_time_keys, fallback)
            return await _count_keys(conn, device_id)

    async def count_one_time_keys(self, device_id: str) -> int:
        pool = await self._connect()
        async with pool.acquire() as conn:
            return await _count_keys(conn, device_id)

    async def claim_key(self, device_id: str) -> tuple[SignedKey, bool] | None:
        pool = await self._connect()
        async with pool.acquire() as conn, conn.transaction():
            # SKIP LOCKED: a key another claim is taking is not waited for (that claim would
            # leave this one with nothing, hence the fallback, while other keys are free).
            key = await conn.fetchval(
                "DELETE FROM one_time_keys WHERE device_id = $1 AND key_id = (SELECT key_id "
                "FROM one_time_keys WHERE device_id = $1 LIMIT 1 FOR UPDATE SKIP LOCKED) "
                "RETURNING key",
                device_id,
            )
            if key is not None:
                return _key_dec.decode(key), False
            fallback = await conn.fetchval(
                "SELECT key FROM fallback_keys WHERE device_id = $1", device_id
            )
        return (_key_dec.decode(fallback), True) if fallback is not None else None

    async def fallback_key(self, device_id: str) -> tuple[SignedKey, bool] | None:
        pool = await self._connect()
        key = await pool.fetchval("SELECT key FROM fallback_keys WHERE device_id = $1", device_id)
        return (_key_dec.decode(key), True) if key is not None else None

    # ---- mailbox ------------------------------------------------------------------------------

    async def write_envelopes(
        self, insert: Sequence[tuple[str, int, bytes]], delete: Sequence[tuple[str, int]]
    ) -> list[int]:
        pool = await self._connect()
        ring = await self._keyring()
        ids: list[int] = []
        async with pool.acquire() as conn, conn.transaction():
            if insert:
                ids = await self._insert(conn, insert)
            if delete:
                await conn.execute(
                    "DELETE FROM envelopes e USING unnest($1::text[], $2::bigint[]) AS t(d, s) "
                    "WHERE e.device_id = t.d AND e.seq = t.s",
                    [ring.mailbox(d) for d, _ in delete],
                    [s for _, s in delete],
                )
        if delete:
            self._deleted = self._destroy_due = True
        return ids

    async def _insert(self, conn: Any, rows: Sequence[tuple[str, int, bytes]]) -> list[int]:
        # Envelopes and counters are kept under mailbox names (sealing.py), not device IDs.
        ring = await self._keyring()
        names = {device_id: ring.mailbox(device_id) for device_id, _, _ in rows}
        counts: dict[str, int] = {}
        for device_id, _, _ in rows:
            counts[names[device_id]] = counts.get(names[device_id], 0) + 1
        devices = sorted(counts)
        # A missing counter row starts at a random origin; a concurrent creator is waited for.
        await conn.execute(
            "INSERT INTO device_seq(device_id, last) "
            "SELECT * FROM unnest($1::text[], $2::bigint[]) ON CONFLICT (device_id) DO NOTHING",
            devices,
            [self._seq_origin() for _ in devices],
        )
        # Lock in device order (no deadlock between two commits), then bump.
        await conn.execute(
            "SELECT 1 FROM device_seq WHERE device_id = ANY($1::text[]) "
            "ORDER BY device_id FOR UPDATE",
            devices,
        )
        bumped = await conn.fetch(
            "UPDATE device_seq s SET last = s.last + t.n "
            "FROM unnest($1::text[], $2::bigint[]) AS t(d, n) WHERE s.device_id = t.d "
            "RETURNING s.device_id, s.last",
            devices,
            [counts[d] for d in devices],
        )
        # The number before this commit's first envelope of each device.
        last = {str(r[0]): int(r[1]) - counts[str(r[0])] for r in bumped}
        ids: list[int] = []
        for device_id, _, _ in rows:
            last[names[device_id]] += 1
            ids.append(last[names[device_id]])
        epochs = [epoch_of(r[1]) for r in rows]
        assert self._keys is not None
        keys = await self._keys.for_epochs(conn, sorted(set(epochs)))
        sealed = [
            seal_body(keys[e], r[0], seq, e, r[2], self._random(NONCE_BYTES))
            for r, seq, e in zip(rows, ids, epochs, strict=True)
        ]
        await conn.execute(
            "INSERT INTO envelopes(device_id, seq, expires_at, body, epoch, size) "
            "SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bytea[], "
            "$5::bigint[], $6::integer[])",
            [names[r[0]] for r in rows],
            ids,
            [r[1] for r in rows],
            sealed,
            epochs,
            [len(r[2]) for r in rows],
        )
        return ids

    async def envelopes_after(
        self, device_id: str, after_seq: int, now: int, limit: int, max_bytes: int | None = None
    ) -> list[tuple[int, bytes]]:
        pool = await self._connect()
        mailbox = (await self._keyring()).mailbox(device_id)
        # The running total is computed from the stored lengths: bodies past the budget are
        # never read (the first envelope always is).
        rows = await pool.fetch(
            "SELECT seq, body, counted.epoch, k.kek_version, k.wrapped FROM ("
            "SELECT seq, body, epoch, SUM(size) OVER (ORDER BY seq) AS total, "
            "ROW_NUMBER() OVER (ORDER BY seq) AS n FROM ("
            "SELECT seq, body, epoch, size FROM envelopes WHERE device_id = $1 AND seq > $2 "
            "AND expires_at > $3 ORDER BY seq LIMIT $4) AS page) AS counted "
            "LEFT JOIN storage_keys k ON k.epoch = counted.epoch "
            "WHERE n = 1 OR $5::bigint IS NULL OR total <= $5::bigint ORDER BY seq",
            mailbox,
            after_seq,
            now,
            limit,
            max_bytes,
        )
        out: list[tuple[int, bytes]] = []
        assert self._keys is not None
        for seq, body, epoch, version, wrapped in rows:
            if epoch is None:  # stored before migration 3
                out.append((int(seq), bytes(body)))
            elif wrapped is not None:  # else its key was destroyed: nobody can open it
                key = self._keys.unwrap(int(epoch), int(version), bytes(wrapped))
                out.append((int(seq), open_body(key, device_id, int(seq), int(epoch), body)))
        return out

    async def count_envelopes(self, device_id: str) -> int:
        pool = await self._connect()
        mailbox = (await self._keyring()).mailbox(device_id)
        return int(
            await pool.fetchval("SELECT COUNT(*) FROM envelopes WHERE device_id = $1", mailbox)
        )

    async def envelope_bytes(self, device_id: str) -> int:
        pool = await self._connect()
        mailbox = (await self._keyring()).mailbox(device_id)
        return int(
            await pool.fetchval(
                "SELECT COALESCE(SUM(size), 0) FROM envelopes WHERE device_id = $1",
                mailbox,
            )
        )

    async def sweep(self, now: int) -> tuple[int, int]:
        pool = await self._connect()
        async with pool.acquire() as conn, conn.transaction():
            envelopes = _rowcount(
                await conn.execute("DELETE FROM envelopes WHERE expires_at <= $1", now)
            )
            links = _rowcount(await conn.execute("DELETE FROM links WHERE expires_at <= $1", now))
        if envelopes:
            self._deleted = self._destroy_due = True
        return envelopes, links

    async def maintenance(self) -> None:
        """Storage keys, then vacuum.

        Keys (when the store has its key file): after envelopes were deleted, and at least every
        ``key_sweep_interval_s``, destroy the key of every epoch with no envelope left; when the
        KEK version changed, re-wrap the live epoch keys under the new version, then move the
        key file to the oldest version still in use (at most one behind the current one),
        overwriting the older key. Vacuum: after envelopes were deleted, and at most once per
        ``vacuum_interval_s``, VACUUM the envelope and licence tables (and the key table when
        its rows changed), so that dead row versions stop being tuples sooner than autovacuum
        would prune them. Vacuum does not zero the space it frees, and the WAL keeps what it
        logged: what makes those copies unreadable is the keys (SECURITY.md)."""
        if self._keys is not None:
            await self._keyring()
            if self._destroy_due or self._clock() - self._keys_swept_at >= (
                self._key_sweep_interval_s
            ):
                await self.destroy_empty_epoch_keys()
            if self._keys.rotation_due():
                await self.rotate()
        if (not self._deleted and not self._keys_changed) or (
            self._clock() - self._vacuumed_at < self._vacuum_interval_s
        ):
            return
        pool = await self._connect()
        tables = "envelopes, licences, one_time_keys" + (
            ", storage_keys, storage_check" if self._keys_changed else ""
        )
        self._deleted = self._keys_changed = False
        self._vacuumed_at = self._clock()
        await pool.execute(f"VACUUM (SKIP_LOCKED) {tables}")

    async def destroy_empty_epoch_keys(self) -> int:
        """Delete the key of every epoch with no envelope left (``pg_keys``); how many went."""
        await self._keyring()
        assert self._keys is not None
        self._destroy_due = False
        self._keys_swept_at = self._clock()
        gone = await self._keys.destroy_empty(await self._connect())
        self._keys_changed = self._keys_changed or gone > 0
        return gone

    async def rotate(self) -> int:
        """Re-wrap the live epoch keys and advance the key file (``pg_keys``); its version."""
        await self._keyring()
        assert self._keys is not None
        self._keys_changed = True
        return await self._keys.rotate(await self._connect())


async def _insert_device(conn: Any, account_id: str, device: DeviceRecord, now: int) -> None:
    await conn.execute(
        "INSERT INTO devices(id, account_id, record, created_at, curve) VALUES ($1, $2, $3, $4, $5)",
        device.keys.ed25519,
        account_id,
        _enc.encode(device),
        now,
        device.keys.curve25519,
    )


async def _add_keys(
    conn: Any, device_id: str, one_time_keys: Iterable[SignedKey], fallback: SignedKey | None
) -> None:
    keys = list(one_time_keys)
    if keys:
        await conn.execute(
            "INSERT INTO one_time_keys(device_id, key_id, key) "
            "SELECT $1, * FROM unnest($2::text[], $3::bytea[]) ON CONFLICT DO NOTHING",
            device_id,
            [k.key_id for k in keys],
            [_enc.encode(k) for k in keys],
        )
    if fallback is not None:
        await conn.execute(
            "INSERT INTO fallback_keys(device_id, key) VALUES ($1, $2) "
            "ON CONFLICT (device_id) DO UPDATE SET key = excluded.key",
            device_id,
            _enc.encode(fallback),
        )


async def _count_keys(conn: Any, device_id: str) -> int:
    return int(
        await conn.fetchval("SELECT COUNT(*) FROM one_time_keys WHERE device_id = $1", device_id)
    )


@dataclass(frozen=True, slots=True)
class Inspection:
    """What the seizure audit (``kluis.audit.postgres``) reads of a live database: where its
    files are, whose IDs it holds and its wrapped storage keys. Read only."""

    database_oid: int
    owner: dict[str, str]  # account and device IDs -> account
    storage_keys: list[tuple[int, int, bytes]]  # (epoch, KEK version, wrapped)
    licence_tags: list[bytes]  # of unredeemed licences
    envelopes: int  # stored
    expired: int  # stored past their expiry at ``now``


async def inspect(dsn: str, now: int) -> Inspection:
    """Read ``dsn``'s facts for the audit (one boundary for the driver: this module)."""
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise ConnectionError(f"cannot reach the PostgreSQL database: {exc}") from exc
    try:
        oid = int(
            await conn.fetchval("SELECT oid FROM pg_database WHERE datname = current_database()")
        )
        owner = {str(r[0]): str(r[0]) for r in await conn.fetch("SELECT id FROM accounts")}
        owner |= {
            str(r[0]): str(r[1]) for r in await conn.fetch("SELECT id, account_id FROM devices")
        }
        keys = [
            (int(r[0]), int(r[1]), bytes(r[2]))
            for r in await conn.fetch("SELECT epoch, kek_version, wrapped FROM storage_keys")
        ]
        tags = [bytes(r[0]) for r in await conn.fetch("SELECT code_hash FROM licences")]
        stored, expired = await conn.fetchrow(
            "SELECT COUNT(*), COUNT(*) FILTER (WHERE expires_at <= $1) FROM envelopes", now
        )
    finally:
        await conn.close()
    return Inspection(oid, owner, keys, tags, int(stored), int(expired))
