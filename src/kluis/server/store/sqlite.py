"""Server persistence on embedded SQLite (WAL), the only module that talks to the database.

Two layers: :class:`SqliteDatabase` does the work, synchronously, on one ``sqlite3`` connection;
:class:`SqliteStore` implements the async ``Store`` protocol (``protocol.py``) by running each
call on one worker thread that owns that connection, so the event loop never waits on the disk.
Calls run one after the other, in the order they were made. The mailbox's group commit makes one
call per event-loop turn (``write_envelopes``), so a busy server pays one thread hop per commit,
not per message.

What is stored, and why it is safe to seize:
- licences: SHA-256 of each unredeemed code (it cannot be read back) and its days; a redeemed code's
  row is deleted, so nothing ties a code to the account it created;
- accounts: a random ID and the subscription window, nothing personal;
- devices: public keys and the approval signature that admitted each one;
- one-time and fallback keys: public keys only;
- envelopes: recipient device, expiry and an opaque sealed body (no sender, no plaintext),
  deleted as soon as the device acknowledges them; laid out so that the file does not say which
  envelopes were deposited together (see "Envelope layout" below);
- device_seq: each device's last envelope sequence number. It starts at a random offset (below
  2**40), so the number does not tell how many envelopes the device has received;
- links: pending device-link requests (public keys), deleted on approval or expiry.

Every multi-row change runs in one transaction: a failure leaves the database as it was.

Envelope layout (unlinkable storage). A send deposits the recipient's envelopes and the sender's
copies for its own other devices in one transaction. Nothing in the file may keep that grouping:
- logical order: rows are keyed by (device, per-device sequence), never by a global id or time;
  expiries are whole hours (mailbox.py);
- page placement: SQLite moves the part of a row beyond the local-payload limit (about 1,000
  bytes on a 4 KiB page) to overflow pages allocated in insert order, so the overflow pages of
  one send came out consecutive and, read in page order, put the recipient's envelope next to the
  sender's copy. Here no envelope byte goes to an overflow page: a body that fits stays inline in
  its (device, seq) row; a longer one keeps a head there and the rest goes to ``envelope_chunks``
  in pieces below the limit, each keyed by SHA-256(device, seq, piece number). Those keys are
  uniformly spread, so each piece lands on the B-tree leaf its key picks, among other envelopes'
  pieces, wherever that leaf is in the file, not at the end of an allocation run. The key is no
  secret (it is derived from the row that is stored anyway); it only has to scatter;
- the WAL: its frames, in file order, are the pages of each commit, that is of each send. The
  server's checkpointer folds and truncates it within ``checkpoint_interval_s`` (1 s) of any
  envelope write (``needs_checkpoint``), then makes one dummy write and folds again, so that the
  shared-memory index (``-shm``), which keeps the page numbers of the last WAL's frames after a
  checkpoint, lists one meaningless page instead of the pages of the last sends (``checkpoint``);
- deletion: secure_delete zeroes the freed bytes; an envelope and its pieces go in one
  transaction (ack, expiry sweep, revocation).
What remains (SECURITY.md): a live copy taken within that second still holds the last commits'
frames; within one B-tree page, SQLite places new cells below older ones, so cells added since
the page was last rebalanced show their relative age (two pieces of one send rarely share a leaf
of a busy table, but on a nearly empty server they can); freed WAL blocks may survive at the
filesystem or flash level, below what a folder copy shows.

A database written before this layout (envelopes without ``size``) is migrated when it is opened,
in one transaction: every pending envelope is rewritten into the new layout and the old table
dropped (its pages zeroed by secure_delete).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import queue
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from kluis.protocol.frames import DeviceRecord, PendingLink, Revocation, SignedKey
from kluis.server.store.protocol import Account, StoredDevice

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS licences (
    code_hash BLOB PRIMARY KEY,
    days INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    identity TEXT NOT NULL DEFAULT ''  -- the identity key the ID is derived from
);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    record BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    curve TEXT,  -- unique server-wide: no device can pose with another's Olm key
    revocation BLOB  -- the signed Revocation, once revoked
);
CREATE INDEX IF NOT EXISTS devices_by_account ON devices(account_id);
CREATE TABLE IF NOT EXISTS one_time_keys (
    device_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key BLOB NOT NULL,
    PRIMARY KEY (device_id, key_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fallback_keys (
    device_id TEXT PRIMARY KEY,
    key BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS links (
    token TEXT PRIMARY KEY,
    keys BLOB NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS wipes (
    device_id TEXT PRIMARY KEY,  -- a device ordered wiped: it gets the order, nothing else
    wipe_order BLOB NOT NULL  -- the signed protocol.operator.WipeOrder
);
"""

# Columns added after the first release: a database made before them gains them at start-up.
_ADDED_COLUMNS = (
    ("accounts", "identity", "TEXT NOT NULL DEFAULT ''"),
    ("devices", "curve", "TEXT"),
    ("devices", "revocation", "BLOB"),
    # The admin console (server/admin/): the reseller that created an unredeemed code, copied to
    # the account on redemption (the only tie kept: which reseller, never which code), and the
    # day (days since the epoch) the account last logged in.
    ("licences", "reseller", "TEXT"),
    ("accounts", "reseller", "TEXT"),
    ("accounts", "last_seen_day", "INTEGER"),
    ("licences", "plan", "TEXT NOT NULL DEFAULT ''"),
    ("accounts", "suspended", "INTEGER NOT NULL DEFAULT 0"),
    ("accounts", "operator_wipe", "INTEGER NOT NULL DEFAULT 1"),  # the operator may wipe
)
_INDEXES = "CREATE UNIQUE INDEX IF NOT EXISTS devices_by_curve ON devices(curve);"

# Kept in (device, seq) order, not in the order of arrival: see insert_envelopes. No row and no
# piece is ever larger than SQLite's local-payload limit: see the module's "Envelope layout".
_ENVELOPE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS envelopes (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,  -- per device: the order of delivery, and the wire id
    expires_at INTEGER NOT NULL,
    body BLOB NOT NULL,  -- the whole body, or its head when it is longer than size
    size INTEGER,  -- the whole body's length, the rest in envelope_chunks (NULL: all in body)
    PRIMARY KEY (device_id, seq)
) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS envelopes_by_expiry ON envelopes(expires_at)",
    """CREATE TABLE IF NOT EXISTS envelope_chunks (
    key BLOB PRIMARY KEY,  -- chunk_key(device, seq, n): scattered, never in order of arrival
    data BLOB NOT NULL
) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS wal_scrub (n INTEGER NOT NULL)",  # see SqliteDatabase.checkpoint
    # Each device's last sequence number, bumped in the envelopes' own transaction.
    """CREATE TABLE IF NOT EXISTS device_seq (
    device_id TEXT PRIMARY KEY,
    last INTEGER NOT NULL
) WITHOUT ROWID""",
)
# A database written before device_seq: each device continues after its largest stored number.
_SEED_SEQ = (
    "INSERT INTO device_seq(device_id, last) SELECT device_id, MAX(seq) FROM envelopes "
    "WHERE true GROUP BY device_id ON CONFLICT(device_id) DO UPDATE SET last = MAX(last, excluded.last)"
)
_SEQ_ORIGIN = 1 << 40
# Room kept in a row for its record header, key and other columns; a longer device ID shortens
# the head (see _put).
_ROW_OVERHEAD = 48
_CHUNK_OVERHEAD = 40  # record header and the 32-byte key of an envelope_chunks row


def local_payload_limit(page_size: int) -> int:
    """The most payload an index (WITHOUT ROWID) B-tree cell keeps on its page (SQLite's maxLocal,
    for a page without reserved bytes); any more goes to overflow pages."""
    return (page_size - 12) * 64 // 255 - 23


def chunk_key(device_id: str, seq: int, n: int) -> bytes:
    """Where piece ``n`` (1, 2, ...) of an envelope's body is kept: a scattered B-tree key."""
    return hashlib.sha256(b"kluis-chunk\0%s\0%d\0%d" % (device_id.encode(), seq, n)).digest()


_record_enc = msgspec.msgpack.Encoder()
_record_dec = msgspec.msgpack.Decoder(DeviceRecord)
_key_dec = msgspec.msgpack.Decoder(SignedKey)
_link_dec = msgspec.msgpack.Decoder(PendingLink)
_revocation_dec = msgspec.msgpack.Decoder(Revocation)


class SqliteDatabase:
    """The synchronous work of :class:`SqliteStore`, on one connection. Use it from one thread
    at a time: the store's worker, or a test or benchmark when no store call is in flight."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "normal",
        seq_origin: Callable[[], int] = lambda: secrets.randbelow(_SEQ_ORIGIN),
    ) -> None:
        if synchronous not in ("normal", "full"):
            raise ValueError("synchronous must be 'normal' or 'full'")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.execute("PRAGMA foreign_keys=ON")
        # Deleted envelopes must not linger in free pages of a seized disk.
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.executescript(_SCHEMA)
        for table, column, decl in _ADDED_COLUMNS:
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        self._db.executescript(_INDEXES)
        limit = local_payload_limit(int(self._db.execute("PRAGMA page_size").fetchone()[0]))
        self._head_max = limit - _ROW_OVERHEAD  # body bytes kept in the envelope's own row
        self._chunk_max = limit - _CHUNK_OVERHEAD  # body bytes per envelope_chunks row
        # True when the WAL may hold what a copy must not show: old copies of deleted rows, or
        # frames of new envelopes in deposit order. The server's checkpointer folds it (1 s).
        self.needs_checkpoint = False
        self._seq_origin = seq_origin  # where a device's first sequence number starts, less one
        self._open_envelopes()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Nestable: only the outermost level begins and commits."""
        if self._db.in_transaction:
            yield self._db
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ---- licences and accounts ----------------------------------------------------------------

    def add_licences(
        self, code_hashes: Sequence[bytes], days: int, now: int, reseller: str | None = None
    ) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO licences(code_hash, days, created_at, reseller) VALUES (?, ?, ?, ?)",
                [(h, days, now, reseller) for h in code_hashes],
            )

    def register(
        self, code_hash: bytes, account_id: str, identity: str, device: DeviceRecord, now: int
    ) -> Account | None:
        """Redeem the licence and create the account with its first device, atomically.

        Returns None (and changes nothing) when the licence is unknown or already redeemed.
        """
        with self.transaction() as db:
            # The redeemed code's row goes: kept with its redemption time, it would tie the code
            # (known to whoever sold it) to the account created in the same second. A code seen
            # again is unknown, hence refused, just as a reused one.
            row = db.execute(
                "DELETE FROM licences WHERE code_hash = ? RETURNING days, reseller",
                (code_hash,),
            ).fetchone()
            if row is None:
                return None
            self.needs_checkpoint = True
            account = Account(account_id, now, now + int(row[0]) * 86_400, identity)
            db.execute(
                "INSERT INTO accounts(id, created_at, expires_at, identity, reseller) "
                "VALUES (?, ?, ?, ?, ?)",
                (account.id, account.created_at, account.expires_at, identity, row[1]),
            )
            self._insert_device(account_id, device, now)
        return account

    def seen(self, account_id: str, day: int) -> None:
        """Record the day an account last logged in (one write per account and day at most)."""
        self._db.execute(
            "UPDATE accounts SET last_seen_day = ? WHERE id = ? AND last_seen_day IS NOT ?",
            (day, account_id, day),
        )

    def account(self, account_id: str) -> Account | None:
        row = self._db.execute(
            "SELECT id, created_at, expires_at, identity, suspended, operator_wipe FROM accounts"
            " WHERE id = ?",
            (account_id,),
        ).fetchone()
        if row is None:
            return None
        return Account(row[0], row[1], row[2], row[3], bool(row[4]), bool(row[5]))

    # ---- devices ------------------------------------------------------------------------------

    def device(self, device_id: str) -> StoredDevice | None:
        row = self._db.execute(
            "SELECT account_id, record, revoked FROM devices WHERE id = ?", (device_id,)
        ).fetchone()
        if row is None:
            return None
        return StoredDevice(row[0], _record_dec.decode(row[1]), bool(row[2]))

    def active_devices(self, account_id: str) -> list[DeviceRecord]:
        rows = self._db.execute(
            "SELECT record FROM devices WHERE account_id = ? AND revoked = 0 ORDER BY created_at, id",
            (account_id,),
        ).fetchall()
        return [_record_dec.decode(r[0]) for r in rows]

    def add_device(self, account_id: str, device: DeviceRecord, link_token: str, now: int) -> bool:
        """Add an approved device with its keys, consuming its link; False if the link is gone."""
        with self.transaction() as db:
            row = db.execute("DELETE FROM links WHERE token = ? RETURNING keys", (link_token,))
            found = row.fetchone()
            if found is None:
                return False
            link = _link_dec.decode(found[0])
            self._insert_device(account_id, device, now)
            self.add_keys(device.keys.ed25519, link.one_time_keys, link.fallback_key)
        return True

    def _insert_device(self, account_id: str, device: DeviceRecord, now: int) -> None:
        self._db.execute(
            "INSERT INTO devices(id, account_id, record, created_at, curve) VALUES (?, ?, ?, ?, ?)",
            (
                device.keys.ed25519,
                account_id,
                _record_enc.encode(device),
                now,
                device.keys.curve25519,
            ),
        )

    def curve_in_use(self, curve: str) -> bool:
        row = self._db.execute("SELECT 1 FROM devices WHERE curve = ?", (curve,)).fetchone()
        return row is not None

    def count_devices(self, account_id: str) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM devices WHERE account_id = ? AND revoked = 0", (account_id,)
        ).fetchone()
        return int(row[0])

    def revocations(self, account_id: str) -> list[Revocation]:
        rows = self._db.execute(
            "SELECT revocation FROM devices WHERE account_id = ? AND revoked = 1 "
            "AND revocation IS NOT NULL ORDER BY created_at, id",
            (account_id,),
        ).fetchall()
        return [_revocation_dec.decode(r[0]) for r in rows]

    def revoke_device(self, device_id: str, revocation: Revocation) -> None:
        """Revoke a device and drop everything held for it: keys and undelivered envelopes."""
        with self.transaction() as db:
            db.execute(
                "UPDATE devices SET revoked = 1, revocation = ? WHERE id = ?",
                (_record_enc.encode(revocation), device_id),
            )
            db.execute("DELETE FROM one_time_keys WHERE device_id = ?", (device_id,))
            db.execute("DELETE FROM fallback_keys WHERE device_id = ?", (device_id,))
            db.execute("DELETE FROM device_seq WHERE device_id = ?", (device_id,))
            self._drop_bodies(
                db.execute(
                    "DELETE FROM envelopes WHERE device_id = ? "
                    "RETURNING device_id, seq, length(body), COALESCE(size, length(body))",
                    (device_id,),
                ).fetchall()
            )
            self.needs_checkpoint = True

    # ---- device links -------------------------------------------------------------------------

    def put_link(self, token: str, link: PendingLink, expires_at: int) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO links(token, keys, expires_at) VALUES (?, ?, ?)",
                (token, _record_enc.encode(link), expires_at),
            )

    def count_links(self, now: int) -> int:
        row = self._db.execute("SELECT COUNT(*) FROM links WHERE expires_at > ?", (now,)).fetchone()
        return int(row[0])

    def link(self, token: str, now: int) -> PendingLink | None:
        row = self._db.execute(
            "SELECT keys FROM links WHERE token = ? AND expires_at > ?", (token, now)
        ).fetchone()
        return _link_dec.decode(row[0]) if row else None

    # ---- key directory ------------------------------------------------------------------------

    def add_keys(
        self, device_id: str, one_time_keys: Iterable[SignedKey], fallback: SignedKey | None
    ) -> int:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO one_time_keys(device_id, key_id, key) VALUES (?, ?, ?)",
                [(device_id, k.key_id, _record_enc.encode(k)) for k in one_time_keys],
            )
            if fallback is not None:
                db.execute(
                    "INSERT OR REPLACE INTO fallback_keys(device_id, key) VALUES (?, ?)",
                    (device_id, _record_enc.encode(fallback)),
                )
        return self.count_one_time_keys(device_id)

    def count_one_time_keys(self, device_id: str) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM one_time_keys WHERE device_id = ?", (device_id,)
        ).fetchone()
        return int(row[0])

    def claim_key(self, device_id: str) -> tuple[SignedKey, bool] | None:
        """Hand out one unused one-time key, atomically; the fallback key when none are left."""
        with self.transaction() as db:
            row = db.execute(
                "DELETE FROM one_time_keys WHERE device_id = ? AND key_id = (SELECT key_id "
                "FROM one_time_keys WHERE device_id = ? LIMIT 1) RETURNING key",
                (device_id, device_id),
            ).fetchone()
            if row is None:
                row = db.execute(
                    "SELECT key FROM fallback_keys WHERE device_id = ?", (device_id,)
                ).fetchone()
                return (_key_dec.decode(row[0]), True) if row else None
        return _key_dec.decode(row[0]), False

    def fallback_key(self, device_id: str) -> tuple[SignedKey, bool] | None:
        """The device's fallback key (reusable, so nothing is consumed), if it published one."""
        row = self._db.execute(
            "SELECT key FROM fallback_keys WHERE device_id = ?", (device_id,)
        ).fetchone()
        return (_key_dec.decode(row[0]), True) if row else None

    # ---- mailbox ------------------------------------------------------------------------------

    def _open_envelopes(self) -> None:
        """Create the envelope tables, or migrate a database of the layout before chunking."""
        columns = {str(r[1]) for r in self._db.execute("PRAGMA table_info(envelopes)")}
        if columns and "size" not in columns:
            self._migrate_envelopes(columns)
            return
        with self.transaction() as db:
            for statement in _ENVELOPE_SCHEMA:
                db.execute(statement)
            db.execute(_SEED_SEQ)

    def _migrate_envelopes(self, columns: set[str]) -> None:
        """Rewrite every pending envelope into the chunked layout, in one transaction.

        The old table kept bodies beyond the local-payload limit in overflow pages allocated in
        deposit order; dropping it (secure_delete) zeroes them.
        """
        if "seq" in columns:
            seq = "seq"
        elif "id" in columns:  # the layout with one global id: number each device's envelopes
            seq = "ROW_NUMBER() OVER (PARTITION BY device_id ORDER BY id)"
        else:
            raise sqlite3.DatabaseError(f"unknown envelopes layout: {sorted(columns)}")
        with self.transaction() as db:
            db.execute("DROP INDEX IF EXISTS envelopes_by_expiry")
            db.execute("ALTER TABLE envelopes RENAME TO envelopes_before_chunks")
            for statement in _ENVELOPE_SCHEMA:
                db.execute(statement)
            old = db.execute(
                f"SELECT device_id, {seq}, expires_at, body FROM envelopes_before_chunks"
            ).fetchall()
            for device_id, n, expires_at, body in sorted(old, key=lambda r: (r[0], r[1])):
                self._put(db, str(device_id), int(n), int(expires_at), bytes(body))
            db.execute("DROP TABLE envelopes_before_chunks")
            db.execute(_SEED_SEQ)
        self.checkpoint()

    def _head(self, device_id: str) -> int:
        """How many body bytes an envelope of ``device_id`` keeps in its own row."""
        return max(0, self._head_max - len(device_id.encode()))

    def _put(
        self, db: sqlite3.Connection, device_id: str, seq: int, expires: int, body: bytes
    ) -> None:
        """One envelope: its row (with the whole body, or its head) and its scattered pieces."""
        head = self._head(device_id)
        db.execute(
            "INSERT INTO envelopes(device_id, seq, expires_at, body, size) VALUES (?, ?, ?, ?, ?)",
            (device_id, seq, expires, body[:head], len(body)),
        )
        if len(body) <= head:
            return  # the usual case: the whole body is in its row
        step = self._chunk_max
        db.executemany(
            "INSERT OR REPLACE INTO envelope_chunks(key, data) VALUES (?, ?)",
            [
                (chunk_key(device_id, seq, n), body[start : start + step])
                for n, start in enumerate(range(head, len(body), step), 1)
            ],
        )

    def _body(self, device_id: str, seq: int, head: bytes, size: int) -> bytes:
        parts = [head]
        have, n = len(head), 0
        while have < size:
            n += 1
            row = self._db.execute(
                "SELECT data FROM envelope_chunks WHERE key = ?", (chunk_key(device_id, seq, n),)
            ).fetchone()
            if row is None:
                raise sqlite3.DatabaseError(f"envelope {seq} of {device_id}: piece {n} missing")
            parts.append(bytes(row[0]))
            have += len(row[0])
        return b"".join(parts)

    def _drop_bodies(self, deleted: Iterable[tuple[str, int, int, int]]) -> None:
        """Delete the pieces of envelopes whose rows were just deleted: (device, seq, head, size)."""
        for device_id, seq, head, size in deleted:
            left, n = int(size) - int(head), 0
            while left > 0:
                n += 1
                row = self._db.execute(
                    "DELETE FROM envelope_chunks WHERE key = ? RETURNING length(data)",
                    (chunk_key(str(device_id), int(seq), n),),
                ).fetchone()
                if row is None:
                    break  # nothing more to delete
                left -= int(row[0])

    def insert_envelopes(self, rows: Sequence[tuple[str, int, bytes]]) -> list[int]:
        """Store (device, expires_at, body) rows in one transaction; return their wire ids.

        A wire id is the envelope's sequence number for its device, and the table is ordered by
        (device, sequence): delivery keeps its order per device while nothing orders envelopes
        *across* devices. With one global, growing id, two envelopes waiting on a seized disk (a
        recipient's and the sender's own copy for another device) would pair sender and
        recipient by adjacency. Long bodies are split so that no page is allocated in deposit
        order either (module docstring).
        """
        ids: list[int] = []
        with self.transaction() as db:
            counts = _count(d for d, _, _ in rows)
            last: dict[str, int] = {}
            for devices in _parts(list(counts)):
                # The counters of many devices in one row (one step, see _ROWS_PER_STATEMENT);
                # this transaction holds the write lock from its start, so none changes before
                # the write below.
                (found,) = db.execute(_seq_sql(len(devices)), devices).fetchone()
                last.update(json.loads(found))
            for device_id in counts:
                if device_id not in last:  # a new row starts at a random origin (module doc)
                    last[device_id] = self._seq_origin()
            for bumps in _parts(list(counts.items())):
                db.execute(
                    _seq_write_sql(len(bumps)), [v for d, n in bumps for v in (d, last[d] + n)]
                )
            whole: list[tuple[str, int, int, bytes, int]] = []
            for device_id, expires_at, body in rows:
                seq = last[device_id] = last[device_id] + 1
                ids.append(seq)
                if len(body) <= self._head(device_id):
                    whole.append((device_id, seq, expires_at, body, len(body)))
                else:
                    self._put(db, device_id, seq, expires_at, body)
            # The usual envelopes (whole in their row): up to _ROWS_PER_STATEMENT per statement.
            for envelopes in _parts(whole):
                db.execute(_insert_sql(len(envelopes)), [v for row in envelopes for v in row])
            if rows:
                self.needs_checkpoint = True  # the WAL now holds this commit's frames
        return ids

    def write_envelopes(
        self, insert: Sequence[tuple[str, int, bytes]], delete: Sequence[tuple[str, int]]
    ) -> list[int]:
        """The mailbox's group commit: ``insert`` and ``delete`` in one transaction."""
        with self.transaction():
            ids = self.insert_envelopes(insert) if insert else []
            if delete:
                self.delete_envelopes(delete)
        return ids

    def envelopes_after(
        self, device_id: str, after_seq: int, now: int, limit: int, max_bytes: int | None = None
    ) -> list[tuple[int, bytes]]:
        """(wire id, body) of a device's live envelopes after ``after_seq``, in order.

        At most ``limit`` of them, and no more than ``max_bytes`` of bodies (the first always):
        rows are read one at a time, so a page never holds more than that in memory.
        """
        out: list[tuple[int, bytes]] = []
        total = 0
        for seq, head, size in self._db.execute(
            "SELECT seq, body, COALESCE(size, length(body)) FROM envelopes "
            "WHERE device_id = ? AND seq > ? AND expires_at > ? ORDER BY seq LIMIT ?",
            (device_id, after_seq, now, limit),
        ).fetchall():
            total += int(size)
            if out and max_bytes is not None and total > max_bytes:
                break
            out.append((int(seq), self._body(device_id, int(seq), bytes(head), int(size))))
        return out

    def delete_envelopes(self, rows: Sequence[tuple[str, int]]) -> int:
        """Delete (device, wire id) rows in one transaction; a device may delete only its own."""
        with self.transaction() as db:
            self.needs_checkpoint = True
            # First the usual envelopes, whole in their row: many per statement.
            whole = sum(
                db.execute(_delete_sql(len(part)), [v for row in part for v in row]).rowcount
                for part in _parts(rows)
            )
            if whole == len(rows):
                return whole
            # Some were kept in pieces (or are gone): those one by one, with their pieces.
            deleted = [
                found
                for device_id, seq in rows
                for found in db.execute(
                    "DELETE FROM envelopes WHERE device_id = ? AND seq = ? "
                    "RETURNING device_id, seq, length(body), COALESCE(size, length(body))",
                    (device_id, seq),
                ).fetchall()
            ]
            self._drop_bodies(deleted)
            return whole + len(deleted)

    def count_envelopes(self, device_id: str) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM envelopes WHERE device_id = ?", (device_id,)
        ).fetchone()
        return int(row[0])

    def envelope_bytes(self, device_id: str) -> int:
        row = self._db.execute(
            # The whole bodies: ``body`` holds only the head of one kept in pieces.
            "SELECT COALESCE(SUM(COALESCE(size, LENGTH(body))), 0) FROM envelopes "
            "WHERE device_id = ?",
            (device_id,),
        ).fetchone()
        return int(row[0])

    def sweep(self, now: int) -> tuple[int, int]:
        """Delete expired envelopes and device links; return how many of each."""
        with self.transaction() as db:
            expired = db.execute(
                "DELETE FROM envelopes WHERE expires_at <= ? "
                "RETURNING device_id, seq, length(body), COALESCE(size, length(body))",
                (now,),
            ).fetchall()
            self._drop_bodies(expired)
            links = db.execute("DELETE FROM links WHERE expires_at <= ?", (now,)).rowcount
        if expired or links:
            self.needs_checkpoint = True  # the checkpointer folds the WAL within 1 s
        return len(expired), int(links)

    # ---- operator (subscriptions, wipes: server/operator/) ----------------------------------

    def add_plan_licences(
        self, code_hashes: Sequence[bytes], days: int, plan: str, now: int
    ) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO licences(code_hash, days, created_at, plan) VALUES (?, ?, ?, ?)",
                [(h, days, now, plan) for h in code_hashes],
            )

    def renew(self, code_hash: bytes, account_id: str, now: int) -> int | None:
        with self.transaction() as db:
            if not db.execute("SELECT 1 FROM accounts WHERE id = ?", (account_id,)).fetchone():
                return None
            row = db.execute(
                "DELETE FROM licences WHERE code_hash = ? RETURNING days", (code_hash,)
            ).fetchone()
            if row is None:
                return None
            self.needs_checkpoint = True  # the code's row must not survive in the WAL
            (expires,) = db.execute(
                "UPDATE accounts SET expires_at = MAX(expires_at, ?) + ? WHERE id = ?"
                " RETURNING expires_at",
                (now, int(row[0]) * 86_400, account_id),
            ).fetchone()
        return int(expires)

    def set_account_flag(self, account_id: str, flag: str, value: bool) -> bool:
        if flag not in ("suspended", "operator_wipe"):
            raise ValueError(flag)
        with self.transaction() as db:
            cur = db.execute(
                f"UPDATE accounts SET {flag} = ? WHERE id = ?", (int(value), account_id)
            )
            return cur.rowcount > 0

    def all_active_devices(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT id FROM devices WHERE revoked = 0")]

    def put_wipe(self, device_id: str, order: bytes) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO wipes(device_id, wipe_order) VALUES (?, ?)",
                (device_id, order),
            )

    def wipe_order(self, device_id: str) -> bytes | None:
        row = self._db.execute(
            "SELECT wipe_order FROM wipes WHERE device_id = ?", (device_id,)
        ).fetchone()
        return bytes(row[0]) if row else None

    def checkpoint(self) -> None:
        """Fold the WAL back into the database and truncate it, so that a copy of the data folder
        holds neither old copies of deleted rows nor the frames of recent deposits, in order.

        A checkpoint leaves the shared-memory index (``-shm``) listing the page numbers of the
        folded frames, in commit order; the first frame of a new WAL clears that list, so one
        dummy write, folded in turn, leaves it naming only the ``wal_scrub`` page.
        """
        if not self._fold():
            return  # another connection is reading (a CLI command): try again next time
        with self.transaction() as db:
            db.execute("DELETE FROM wal_scrub")
            db.execute("INSERT INTO wal_scrub(n) VALUES (0)")
        self.needs_checkpoint = not self._fold()

    def maintenance(self) -> None:
        if self.needs_checkpoint:
            self.checkpoint()

    def _fold(self) -> bool:
        busy = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        return not busy


# Rows per multi-row statement of the group commit. Each statement is one sqlite3_step, and
# the sqlite3 module lets go of the GIL around every step: on a busy server each of those costs
# a hand-over between the store's thread and the event loop, so the commit makes few of them.
_ROWS_PER_STATEMENT = 64


def _parts(rows: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        yield rows[start : start + _ROWS_PER_STATEMENT]


@functools.cache
def _seq_sql(n: int) -> str:
    marks = ", ".join(["?"] * n)
    return f"SELECT json_group_object(device_id, last) FROM device_seq WHERE device_id IN ({marks})"


@functools.cache
def _seq_write_sql(n: int) -> str:
    values = ", ".join(["(?, ?)"] * n)
    return (
        f"INSERT INTO device_seq(device_id, last) VALUES {values} "
        "ON CONFLICT(device_id) DO UPDATE SET last = excluded.last"
    )


@functools.cache
def _insert_sql(n: int) -> str:
    values = ", ".join(["(?, ?, ?, ?, ?)"] * n)
    return f"INSERT INTO envelopes(device_id, seq, expires_at, body, size) VALUES {values}"


@functools.cache
def _delete_sql(n: int) -> str:
    """Delete ``n`` (device, seq) envelopes that are whole in their row: each term is a search
    on the primary key (SQLite's multi-index OR; a row-value IN scanned the table)."""
    terms = " OR ".join(["(device_id = ? AND seq = ?)"] * n)
    return f"DELETE FROM envelopes WHERE ({terms}) AND COALESCE(size, length(body)) <= length(body)"


def _count(devices: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in devices:
        counts[d] = counts.get(d, 0) + 1
    return counts


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


_Call = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class SqliteStore:
    """The ``Store`` on SQLite: every call runs on one worker thread that owns the connection.

    The thread takes calls from a queue and hands each result back with one
    ``call_soon_threadsafe``: about half the CPU of a ``ThreadPoolExecutor`` round trip, which
    the group commit pays once per batch. ``db`` is the synchronous layer, for tests and
    benchmarks that look at the file's layout.
    """

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "normal",
        seq_origin: Callable[[], int] = lambda: secrets.randbelow(_SEQ_ORIGIN),
    ) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        opened: Future[SqliteDatabase] = Future()
        # Opened on the worker: the connection belongs to that thread from the start.
        self._thread = threading.Thread(
            target=self._serve,
            args=(opened, path, synchronous, seq_origin),
            name="kluis-sqlite",
            daemon=True,
        )
        self._thread.start()
        self.db = opened.result()
        self.path = path

    def _serve(
        self,
        opened: Future[SqliteDatabase],
        path: Path,
        synchronous: str,
        seq_origin: Callable[[], int],
    ) -> None:
        try:
            db = SqliteDatabase(path, synchronous=synchronous, seq_origin=seq_origin)
        except BaseException as exc:
            opened.set_exception(exc)
            return
        opened.set_result(db)
        while (call := self._calls.get()) is not None:
            loop, fut, fn, args = call
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for it
                loop.call_soon_threadsafe(_settle, fut, result, error)

    def _run(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_T] = loop.create_future()
        self._calls.put((loop, fut, fn, args))
        return fut

    @property
    def needs_checkpoint(self) -> bool:
        return self.db.needs_checkpoint

    @staticmethod
    def footprint_at(path: Path) -> list[Path]:
        """The files of a SQLite store at ``path``, without opening it (opening would change
        them): the database, then the files SQLite keeps beside it."""
        return [path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))]

    def footprint(self) -> list[Path]:
        return self.footprint_at(self.path)

    async def close(self) -> None:
        await self._run(self.db.close)
        self._calls.put(None)
        self._thread.join()

    async def add_licences(
        self, code_hashes: Sequence[bytes], days: int, now: int, reseller: str | None = None
    ) -> None:
        await self._run(self.db.add_licences, code_hashes, days, now, reseller)

    async def seen(self, account_id: str, day: int) -> None:
        await self._run(self.db.seen, account_id, day)

    async def run_on_database(self, fn: Callable[[SqliteDatabase], _T]) -> _T:
        """Run ``fn`` on the worker thread that owns the connection, after every call made
        before it: how the admin console's store (``server/admin/store.py``) shares this
        database without a second connection."""
        return await self._run(fn, self.db)

    async def register(
        self, code_hash: bytes, account_id: str, identity: str, device: DeviceRecord, now: int
    ) -> Account | None:
        return await self._run(self.db.register, code_hash, account_id, identity, device, now)

    async def account(self, account_id: str) -> Account | None:
        return await self._run(self.db.account, account_id)

    async def device(self, device_id: str) -> StoredDevice | None:
        return await self._run(self.db.device, device_id)

    async def active_devices(self, account_id: str) -> list[DeviceRecord]:
        return await self._run(self.db.active_devices, account_id)

    async def add_device(
        self, account_id: str, device: DeviceRecord, link_token: str, now: int
    ) -> bool:
        return await self._run(self.db.add_device, account_id, device, link_token, now)

    async def curve_in_use(self, curve: str) -> bool:
        return await self._run(self.db.curve_in_use, curve)

    async def count_devices(self, account_id: str) -> int:
        return await self._run(self.db.count_devices, account_id)

    async def revocations(self, account_id: str) -> list[Revocation]:
        return await self._run(self.db.revocations, account_id)

    async def revoke_device(self, device_id: str, revocation: Revocation) -> None:
        await self._run(self.db.revoke_device, device_id, revocation)

    async def put_link(self, token: str, link: PendingLink, expires_at: int) -> None:
        await self._run(self.db.put_link, token, link, expires_at)

    async def count_links(self, now: int) -> int:
        return await self._run(self.db.count_links, now)

    async def link(self, token: str, now: int) -> PendingLink | None:
        return await self._run(self.db.link, token, now)

    async def add_keys(
        self, device_id: str, one_time_keys: Sequence[SignedKey], fallback: SignedKey | None
    ) -> int:
        return await self._run(self.db.add_keys, device_id, one_time_keys, fallback)

    async def count_one_time_keys(self, device_id: str) -> int:
        return await self._run(self.db.count_one_time_keys, device_id)

    async def claim_key(self, device_id: str) -> tuple[SignedKey, bool] | None:
        return await self._run(self.db.claim_key, device_id)

    async def fallback_key(self, device_id: str) -> tuple[SignedKey, bool] | None:
        return await self._run(self.db.fallback_key, device_id)

    async def write_envelopes(
        self, insert: Sequence[tuple[str, int, bytes]], delete: Sequence[tuple[str, int]]
    ) -> list[int]:
        return await self._run(self.db.write_envelopes, insert, delete)

    async def insert_envelopes(self, rows: Sequence[tuple[str, int, bytes]]) -> list[int]:
        return await self._run(self.db.insert_envelopes, rows)

    async def delete_envelopes(self, rows: Sequence[tuple[str, int]]) -> int:
        return await self._run(self.db.delete_envelopes, rows)

    async def envelopes_after(
        self, device_id: str, after_seq: int, now: int, limit: int, max_bytes: int | None = None
    ) -> list[tuple[int, bytes]]:
        return await self._run(self.db.envelopes_after, device_id, after_seq, now, limit, max_bytes)

    async def count_envelopes(self, device_id: str) -> int:
        return await self._run(self.db.count_envelopes, device_id)

    async def envelope_bytes(self, device_id: str) -> int:
        return await self._run(self.db.envelope_bytes, device_id)

    async def sweep(self, now: int) -> tuple[int, int]:
        return await self._run(self.db.sweep, now)

    # ---- operator ---------------------------------------------------------------------------

    async def add_plan_licences(
        self, code_hashes: Sequence[bytes], days: int, plan: str, now: int
    ) -> None:
        await self._run(self.db.add_plan_licences, code_hashes, days, plan, now)

    async def renew(self, code_hash: bytes, account_id: str, now: int) -> int | None:
        return await self._run(self.db.renew, code_hash, account_id, now)

    async def set_account_flag(self, account_id: str, flag: str, value: bool) -> bool:
        return await self._run(self.db.set_account_flag, account_id, flag, value)

    async def all_active_devices(self) -> list[str]:
        return await self._run(self.db.all_active_devices)

    async def put_wipe(self, device_id: str, order: bytes) -> None:
        await self._run(self.db.put_wipe, device_id, order)

    async def wipe_order(self, device_id: str) -> bytes | None:
        return await self._run(self.db.wipe_order, device_id)

    async def maintenance(self) -> None:
        if self.db.needs_checkpoint:  # read without the thread hop: a stale answer waits 1 s
            await self._run(self.db.maintenance)
