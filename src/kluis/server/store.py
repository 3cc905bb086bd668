"""Server persistence on embedded SQLite (WAL), the only module that talks to the database.

What is stored, and why it is safe to seize:
- licences: SHA-256 of each unredeemed code (it cannot be read back) and its days; a redeemed code's
  row is deleted, so nothing ties a code to the account it created;
- accounts: a random ID and the subscription window, nothing personal;
- devices: public keys and the approval signature that admitted each one;
- one-time and fallback keys: public keys only;
- envelopes: recipient device, expiry and an opaque sealed body (no sender, no plaintext),
  deleted as soon as the device acknowledges them;
- links: pending device-link requests (public keys), deleted on approval or expiry.

Every multi-row change runs in one transaction: a failure leaves the database as it was.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgspec

from kluis.protocol.frames import DeviceRecord, PendingLink, Revocation, SignedKey

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
-- Kept in (device, seq) order, not in the order of arrival: see insert_envelopes.
CREATE TABLE IF NOT EXISTS envelopes (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,  -- per device: the order of delivery, and the wire id
    expires_at INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (device_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS envelopes_by_expiry ON envelopes(expires_at);
CREATE TABLE IF NOT EXISTS links (
    token TEXT PRIMARY KEY,
    keys BLOB NOT NULL,
    expires_at INTEGER NOT NULL
);
"""

# Columns added after the first release: a database made before them gains them at start-up.
_ADDED_COLUMNS = (
    ("accounts", "identity", "TEXT NOT NULL DEFAULT ''"),
    ("devices", "curve", "TEXT"),
    ("devices", "revocation", "BLOB"),
)
_INDEXES = "CREATE UNIQUE INDEX IF NOT EXISTS devices_by_curve ON devices(curve);"

_record_enc = msgspec.msgpack.Encoder()
_record_dec = msgspec.msgpack.Decoder(DeviceRecord)
_key_dec = msgspec.msgpack.Decoder(SignedKey)
_link_dec = msgspec.msgpack.Decoder(PendingLink)
_revocation_dec = msgspec.msgpack.Decoder(Revocation)


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    created_at: int
    expires_at: int
    identity: str = ""


@dataclass(frozen=True, slots=True)
class StoredDevice:
    account_id: str
    record: DeviceRecord
    revoked: bool


class SqliteStore:
    """Synchronous store; calls are short and run on the server's event loop thread."""

    def __init__(self, path: Path, *, synchronous: str = "normal") -> None:
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
        self.deleted_since_checkpoint = False  # old copies of deleted rows may sit in the WAL
        self._last_seq: dict[str, int] = {}  # per device; a stale value is caught by the index

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

    def add_licences(self, code_hashes: Sequence[bytes], days: int, now: int) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO licences(code_hash, days, created_at) VALUES (?, ?, ?)",
                [(h, days, now) for h in code_hashes],
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
                "DELETE FROM licences WHERE code_hash = ? RETURNING days",
                (code_hash,),
            ).fetchone()
            if row is None:
                return None
            self.deleted_since_checkpoint = True
            account = Account(account_id, now, now + int(row[0]) * 86_400, identity)
            db.execute(
                "INSERT INTO accounts(id, created_at, expires_at, identity) VALUES (?, ?, ?, ?)",
                (account.id, account.created_at, account.expires_at, identity),
            )
            self._insert_device(account_id, device, now)
        return account

    def account(self, account_id: str) -> Account | None:
        row = self._db.execute(
            "SELECT id, created_at, expires_at, identity FROM accounts WHERE id = ?", (account_id,)
        ).fetchone()
        return Account(*row) if row else None

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
            db.execute("DELETE FROM envelopes WHERE device_id = ?", (device_id,))
            self.deleted_since_checkpoint = True

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

    def insert_envelopes(self, rows: Sequence[tuple[str, int, bytes]]) -> list[int]:
        """Store (device, expires_at, body) rows in one transaction; return their wire ids.

        A wire id is the envelope's sequence number for its device, and the table is ordered by
        (device, sequence): delivery keeps its order per device while nothing orders envelopes
        *across* devices. With one global, growing id, two envelopes waiting on a seized disk (a
        recipient's and the sender's own copy for another device) would pair sender and
        recipient by adjacency.
        """
        ids: list[int] = []
        with self.transaction() as db:
            for device_id, expires_at, body in rows:
                for attempt in range(2):
                    seq = self._next_seq(device_id, reload=attempt > 0)
                    try:
                        db.execute(
                            "INSERT INTO envelopes(device_id, seq, expires_at, body) "
                            "VALUES (?, ?, ?, ?)",
                            (device_id, seq, expires_at, body),
                        )
                        break
                    except sqlite3.IntegrityError:  # a stale sequence cache: count again
                        if attempt:
                            raise
                ids.append(seq)
        return ids

    def _next_seq(self, device_id: str, *, reload: bool = False) -> int:
        last = None if reload else self._last_seq.get(device_id)
        if last is None:
            row = self._db.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM envelopes WHERE device_id = ?", (device_id,)
            ).fetchone()
            last = int(row[0])
        self._last_seq[device_id] = last + 1
        return last + 1

    def envelopes_after(
        self, device_id: str, after_seq: int, now: int, limit: int, max_bytes: int | None = None
    ) -> list[tuple[int, bytes]]:
        """(wire id, body) of a device's live envelopes after ``after_seq``, in order.

        At most ``limit`` of them, and no more than ``max_bytes`` of bodies (the first always):
        rows are read one at a time, so a page never holds more than that in memory.
        """
        out: list[tuple[int, bytes]] = []
        total = 0
        for seq, body in self._db.execute(
            "SELECT seq, body FROM envelopes WHERE device_id = ? AND seq > ? "
            "AND expires_at > ? ORDER BY seq LIMIT ?",
            (device_id, after_seq, now, limit),
        ):
            total += len(body)
            if out and max_bytes is not None and total > max_bytes:
                break
            out.append((int(seq), bytes(body)))
        return out

    def delete_envelopes(self, rows: Sequence[tuple[str, int]]) -> int:
        """Delete (device, wire id) rows in one transaction; a device may delete only its own."""
        with self.transaction() as db:
            cur = db.executemany("DELETE FROM envelopes WHERE device_id = ? AND seq = ?", rows)
            self.deleted_since_checkpoint = True
            return int(cur.rowcount)

    def count_envelopes(self, device_id: str) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM envelopes WHERE device_id = ?", (device_id,)
        ).fetchone()
        return int(row[0])

    def envelope_bytes(self, device_id: str) -> int:
        row = self._db.execute(
            "SELECT COALESCE(SUM(LENGTH(body)), 0) FROM envelopes WHERE device_id = ?",
            (device_id,),
        ).fetchone()
        return int(row[0])

    def sweep(self, now: int) -> tuple[int, int]:
        """Delete expired envelopes and device links; return how many of each."""
        with self.transaction() as db:
            env = db.execute("DELETE FROM envelopes WHERE expires_at <= ?", (now,)).rowcount
            links = db.execute("DELETE FROM links WHERE expires_at <= ?", (now,)).rowcount
        if env or links:
            self.deleted_since_checkpoint = True  # the checkpointer folds the WAL within 1 s
        return int(env), int(links)

    def checkpoint(self) -> None:
        """Fold the WAL back into the database so deleted rows leave no copy in the WAL file."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.deleted_since_checkpoint = False
