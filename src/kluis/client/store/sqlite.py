"""The profile: a device's keys, sessions, pins and message history, encrypted at rest.

Layout of a profile folder:
- ``profile.json``: argon2id parameters and salt, and a verifier (an AEAD box of a known string)
  that tells a wrong passphrase apart from a damaged file. Nothing secret.
- ``profile.sqlite3`` (WAL): every value is a ChaCha20-Poly1305 box bound to its row (AAD), under
  a key derived from the passphrase. Lookups use keyed digests (HMAC), never plaintext IDs.

Implements :class:`kluis.client.store.protocol.ClientStore`. Every change of crypto state happens
inside :meth:`ProfileStore.transaction`, and callers commit before anything goes on the wire (a
restored older session state would reuse message keys).

Caches: decrypted named records that were read, each peer's sessions once listed, and the keyed
digests of peer and account IDs are kept in memory and written through, so a message costs a few
statements instead of a score. Another process may write the same profile (``kluis send`` while
``kluis listen`` runs): the caches are dropped whenever ``PRAGMA data_version`` says another
connection committed, checked at the start of every transaction (under its write lock, so the
session state a message is encrypted with is always the latest) and before every read outside
one. A rollback drops them too.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType

import msgspec
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kluis.crypto.aead import RecordCipher
from kluis.crypto.profile_key import KdfParams, derive_key, new_params
from kluis.errors import DecryptionError, LocalProtocolError, WrongPassphrase

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    peer BLOB NOT NULL,
    used INTEGER NOT NULL,  -- always 0: the time of use is inside the encrypted value
    value BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_peer ON sessions(peer, used);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    peer BLOB NOT NULL,
    value BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_peer ON messages(peer, seq);
CREATE TABLE IF NOT EXISTS seen (digest BLOB PRIMARY KEY) WITHOUT ROWID;
"""

_VERIFIER = b"kluis-profile-v1"


class ProfileMeta(msgspec.Struct, frozen=True):
    kdf: KdfParams
    verifier: bytes


def _subkey(key: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(key)


class ProfileStore:
    META = "profile.json"
    DB = "profile.sqlite3"

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = path
        self._cipher = RecordCipher(_subkey(key, b"kluis-profile-records"))
        self.pickle_key = _subkey(key, b"kluis-profile-pickles")
        self._db = sqlite3.connect(path / self.DB, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL, not NORMAL: in WAL mode NORMAL skips the fsync at each commit, so a power loss
        # may take back the last commits. Every commit here is either crypto state that is about
        # to go on the wire (an older Olm session restored would reuse message keys) or a
        # message about to be shown and acknowledged (the server then deletes it). The cost of
        # FULL is paid per commit, so the callers group work into few commits instead: one per
        # send, one per batch of received envelopes.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.executescript(_SCHEMA)
        self._depth = 0
        self._kv: dict[str, bytes | None] = {}  # name -> plaintext (None: no such record)
        self._sessions: dict[bytes, list[tuple[int, int, bytes]]] = {}  # peer -> (used, id, value)
        self._blinded: dict[str, bytes] = {}
        self._next_seq: int | None = None  # the next message's seq (AUTOINCREMENT's, known)
        self._version = self._data_version()

    def _data_version(self) -> int:
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def _fresh(self) -> None:
        """Drop the caches if another connection committed since we last looked."""
        version = self._data_version()
        if version != self._version:
            self._version = version
            self._drop_caches()

    def _drop_caches(self) -> None:
        self._kv.clear()
        self._sessions.clear()
        self._next_seq = None

    def _read(self) -> None:
        if self._depth == 0:
            self._fresh()

    # ---- opening ------------------------------------------------------------------------------

    @classmethod
    def exists(cls, path: Path) -> bool:
        return (path / cls.META).exists()

    @classmethod
    def create(cls, path: Path, passphrase: str, params: KdfParams | None = None) -> ProfileStore:
        if cls.exists(path):
            raise LocalProtocolError(f"a profile already exists in {path}")
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        params = params or new_params()
        key = derive_key(passphrase, params)
        verifier = RecordCipher(_subkey(key, b"kluis-profile-verifier")).encrypt(_VERIFIER, b"")
        tmp = path / (cls.META + ".tmp")
        tmp.write_bytes(msgspec.json.encode(ProfileMeta(kdf=params, verifier=verifier)))
        os.replace(tmp, path / cls.META)  # atomic: a half-written profile never looks valid
        return cls(path, key)

    @classmethod
    def _meta(cls, path: Path) -> ProfileMeta:
        if not cls.exists(path):
            raise LocalProtocolError(f"no profile in {path}; register or request a device first")
        try:
            return msgspec.json.decode((path / cls.META).read_bytes(), type=ProfileMeta)
        except msgspec.DecodeError as exc:
            raise LocalProtocolError(f"{path / cls.META} is damaged") from exc

    @classmethod
    def kdf_params(cls, path: Path) -> KdfParams:
        """The argon2id parameters of the profile in ``path`` (to derive its key elsewhere,
        say while a command loads the rest of its code: see :meth:`open`'s ``key``)."""
        return cls._meta(path).kdf

    @classmethod
    def open(cls, path: Path, passphrase: str, *, key: bytes | None = None) -> ProfileStore:
        """Unlock the profile in ``path``; ``key``: derived already from ``passphrase`` with
        :meth:`kdf_params` (checked all the same: a wrong one is a wrong passphrase)."""
        meta = cls._meta(path)
        if key is None:
            key = derive_key(passphrase, meta.kdf)
        try:
            RecordCipher(_subkey(key, b"kluis-profile-verifier")).decrypt(meta.verifier, b"")
        except DecryptionError as exc:
            raise WrongPassphrase("wrong passphrase for this profile") from exc
        return cls(path, key)

    def close(self) -> None:
        self._db.close()

    def destroy(self) -> None:
        """Close and delete this profile's files (a profile whose set-up failed)."""
        self.close()
        for name in (self.DB, self.DB + "-wal", self.DB + "-shm", self.META):
            (self.path / name).unlink(missing_ok=True)

    # ---- transactions -------------------------------------------------------------------------

    def transaction(self) -> AbstractContextManager[None]:
        """Nestable; only the outermost level commits."""
        return _Level(self, savepoint=False)

    def savepoint(self) -> AbstractContextManager[None]:
        """Inside a transaction, an exception rolls back only this block's writes."""
        return _Level(self, savepoint=True)

    def _begin(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._fresh()
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _end(self, ok: bool) -> None:
        if not ok:
            self._drop_caches()  # they may hold what is being rolled back
            self._db.execute("ROLLBACK")
            return
        try:
            self._db.execute("COMMIT")
        except BaseException:
            # e.g. disk full or an I/O error: nothing of it is kept (and none may be acked)
            self._drop_caches()
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def blind(self, data: str | bytes) -> bytes:
        if isinstance(data, bytes):
            return self._cipher.blind(data)
        digest = self._blinded.get(data)
        if digest is None:
            if len(self._blinded) >= 4096:
                self._blinded.clear()
            digest = self._blinded[data] = self._cipher.blind(data.encode())
        return digest

    # ---- key/value ----------------------------------------------------------------------------

    def get(self, name: str) -> bytes | None:
        self._read()
        if name in self._kv:
            return self._kv[name]
        row = self._db.execute("SELECT value FROM kv WHERE name = ?", (name,)).fetchone()
        value = self._cipher.decrypt(row[0], b"kv:" + name.encode()) if row else None
        self._kv[name] = value
        return value

    def put(self, name: str, value: bytes) -> None:
        with self.transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO kv(name, value) VALUES (?, ?)",
                (name, self._cipher.encrypt(value, b"kv:" + name.encode())),
            )
            if name in self._kv:  # written through; records never read (quarantine) stay out
                self._kv[name] = bytes(value)

    def names(self, prefix: str) -> list[str]:
        self._read()
        rows = self._db.execute(
            "SELECT name FROM kv WHERE name >= ? AND name < ?", (prefix, prefix + "\uffff")
        ).fetchall()
        return [str(r[0]) for r in rows]

    # ---- Olm sessions -------------------------------------------------------------------------

    def sessions(self, peer: str) -> list[tuple[int, bytes]]:
        """(row id, value) for a peer device, most recently used first.

        When a session was last used is kept inside its encrypted value (a plaintext column
        would tell a thief of the profile when each conversation was active).
        """
        self._read()
        blinded = self.blind(peer)
        out = self._sessions.get(blinded)
        if out is None:
            rows = self._db.execute(
                "SELECT id, value FROM sessions WHERE peer = ?", (blinded,)
            ).fetchall()
            out = []
            for i, v in rows:
                plain = self._cipher.decrypt(v, b"session:" + str(i).encode())
                out.append((int.from_bytes(plain[:8], "big", signed=True), int(i), plain[8:]))
            out.sort(reverse=True)
            self._sessions[blinded] = out
        return [(i, value) for _, i, value in out]

    def save_session(self, row_id: int | None, peer: str, value: bytes, used: int) -> int:
        with self.transaction():
            if row_id is None:
                cur = self._db.execute(
                    "INSERT INTO sessions(peer, used, value) VALUES (?, 0, x'')",
                    (self.blind(peer),),
                )
                row_id = int(cur.lastrowid or 0)
            sealed = self._cipher.encrypt(
                used.to_bytes(8, "big", signed=True) + value, b"session:" + str(row_id).encode()
            )
            self._db.execute("UPDATE sessions SET value = ? WHERE id = ?", (sealed, row_id))
            cached = self._sessions.get(self.blind(peer))
            if cached is not None:
                kept = [row for row in cached if row[1] != row_id]
                kept.append((used, row_id, bytes(value)))
                kept.sort(reverse=True)
                self._sessions[self.blind(peer)] = kept
        return row_id

    def drop_sessions(self, peer: str) -> None:
        with self.transaction():
            self._db.execute("DELETE FROM sessions WHERE peer = ?", (self.blind(peer),))
            self._sessions.pop(self.blind(peer), None)

    # ---- history and replay protection --------------------------------------------------------

    def add_message(self, peer: str, value: bytes) -> None:
        with self.transaction():
            # The value is bound to its seq, so the seq is chosen here (as AUTOINCREMENT would:
            # past any seq ever used) and the row written in one statement. Under the write
            # lock, and the cache is dropped whenever another connection commits.
            seq = self._next_seq
            if seq is None:
                row = self._db.execute(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'messages'"
                ).fetchone()
                seq = int(row[0]) + 1 if row else 1
            self._db.execute(
                "INSERT INTO messages(seq, peer, value) VALUES (?, ?, ?)",
                (
                    seq,
                    self.blind(peer),
                    self._cipher.encrypt(value, b"message:" + str(seq).encode()),
                ),
            )
            self._next_seq = seq + 1

    def messages(self, peer: str | None = None) -> list[bytes]:
        if peer is None:
            rows = self._db.execute("SELECT seq, value FROM messages ORDER BY seq").fetchall()
        else:
            rows = self._db.execute(
                "SELECT seq, value FROM messages WHERE peer = ? ORDER BY seq", (self.blind(peer),)
            ).fetchall()
        return [self._cipher.decrypt(v, b"message:" + str(s).encode()) for s, v in rows]

    def message_rows(self, peer: str | None = None, after: int = 0) -> list[tuple[int, bytes]]:
        if peer is None:
            rows = self._db.execute(
                "SELECT seq, value FROM messages WHERE seq > ? ORDER BY seq", (after,)
            ).fetchall()
        else:
            rows = self._db.execute(
                "SELECT seq, value FROM messages WHERE peer = ? AND seq > ? ORDER BY seq",
                (self.blind(peer), after),
            ).fetchall()
        return [(int(s), self._cipher.decrypt(v, b"message:" + str(s).encode())) for s, v in rows]

    def delete_messages(self, seqs: Sequence[int]) -> None:
        # secure_delete (set at open) overwrites the freed space in the database file itself.
        with self.transaction():
            self._db.executemany("DELETE FROM messages WHERE seq = ?", [(s,) for s in seqs])

    def delete(self, name: str) -> None:
        with self.transaction():
            self._db.execute("DELETE FROM kv WHERE name = ?", (name,))
            self._kv[name] = None

    def scrub(self) -> None:
        """Copy the write-ahead log into the database (whose freed pages secure_delete zeroed)
        and truncate it: the WAL still holds the pages as they were before a deletion."""
        if self._depth:
            raise LocalProtocolError("scrub() runs outside a transaction")
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def seen(self, token: bytes) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM seen WHERE digest = ?", (self.blind(token),)
        ).fetchone()
        return row is not None

    def mark_seen(self, token: bytes) -> None:
        with self.transaction():
            self._db.execute("INSERT OR IGNORE INTO seen(digest) VALUES (?)", (self.blind(token),))


class _Level:
    """One level of :meth:`ProfileStore.transaction` or :meth:`ProfileStore.savepoint`.

    A class rather than a generator: every write enters a level, several per message.
    """

    __slots__ = ("_savepoint", "_store")

    def __init__(self, store: ProfileStore, *, savepoint: bool) -> None:
        self._store = store
        self._savepoint = savepoint  # becomes False when it is the outermost level

    def __enter__(self) -> None:
        store = self._store
        if store._depth == 0:
            store._begin()
            self._savepoint = False
        elif self._savepoint:
            store._db.execute(f"SAVEPOINT sp{store._depth}")
        store._depth += 1

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        store = self._store
        store._depth -= 1
        if store._depth == 0:
            store._end(t is None)
        elif self._savepoint:
            if t is not None:
                store._drop_caches()  # they may hold what is being rolled back
                store._db.execute(f"ROLLBACK TO sp{store._depth}")
            store._db.execute(f"RELEASE sp{store._depth}")
