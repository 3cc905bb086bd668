"""The PostgreSQL store's storage keys: the key file, the epoch keys, their destruction and the
KEK rotation (the scheme is ``sealing.py``'s; SECURITY.md, "On PostgreSQL").

Theory of operation: :class:`StorageKeys` is the one holder of a node's key ring and of the
unwrapped epoch keys it has used (cached by their wrapped form, so a re-wrapped or re-created key
is never confused with an old one). It works on connections and pools handed in by
``postgres.PostgresStore`` (which alone imports the driver) and keeps two tables:

- ``storage_check``: one value sealed under the current KEK. A node whose file does not open it
  refuses to start; a database without it gets its key file made (``--init`` semantics: a file
  already at the path, e.g. copied from another node or made by a node starting at the same
  moment, is used), and its older rows renamed (licences to tags, envelopes and counters to
  mailbox names), under an advisory lock.
- ``storage_keys``: (epoch, KEK version, wrapped key). A commit sealing under a key holds its row
  ``FOR SHARE``; destruction and re-wrapping take rows ``FOR UPDATE SKIP LOCKED`` and leave the
  locked ones for their next round, so neither waits for the mailbox nor deletes a key a commit
  is about to use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kluis.errors import StorageKeyError
from kluis.server.store.sealing import (
    KEY_BYTES,
    NONCE_BYTES,
    KeyFile,
    KeyRing,
    check_value,
    matches,
)

# Serialises the first key set-up of nodes starting together (pg_advisory_xact_lock).
_KEY_LOCK = 0x6B6C756974
_CACHE = 4096  # unwrapped epoch keys kept; about the epochs of the TTL, several times over


def _rowcount(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])


class StorageKeys:
    """A node's storage keys for the database it is connected to."""

    def __init__(
        self,
        path: Path,
        *,
        period_s: int,
        wall_clock: Callable[[], float],
        random: Callable[[int], bytes],
    ) -> None:
        self.path = path
        self._period_s = period_s
        self._wall = wall_clock
        self._random = random
        self._ring: KeyRing | None = None
        self._lock = asyncio.Lock()
        self._cache: dict[tuple[int, int, bytes], bytes] = {}

    @property
    def ring(self) -> KeyRing:
        if self._ring is None:
            raise StorageKeyError("the storage key file has not been read yet")
        return self._ring

    async def load(self, pool: Any) -> KeyRing:
        """The ring, read (and checked against the database) at the first call."""
        if self._ring is None:
            async with self._lock:
                if self._ring is None:
                    self._ring = await self._load(pool)
        return self._ring

    async def _load(self, pool: Any) -> KeyRing:
        keys = KeyFile(self.path)
        now = self._wall()
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _KEY_LOCK)
            row = await conn.fetchrow("SELECT kek_version, sealed FROM storage_check")
            if row is None:
                fresh = KeyRing.new(now, self._period_s, self._random)
                ring = keys.load() if keys.exists() else keys.create(fresh)
                version = max(ring.version, ring.version_at(now))
                await conn.execute(
                    "INSERT INTO storage_check(id, kek_version, sealed) VALUES (1, $1, $2)",
                    version,
                    check_value(ring, version, self._random(NONCE_BYTES)),
                )
                await _rename_older_rows(conn, ring)
                return ring
            if not keys.exists():
                raise StorageKeyError(
                    f"this database's envelopes are sealed under a storage key file and there "
                    f"is none at {self.path}: copy it from another node of this deployment"
                )
            ring = keys.load()
            if not matches(ring, bytes(row[1]), int(row[0])):
                raise StorageKeyError(f"the storage key file {self.path} is not this database's")
            return ring

    # ---- epoch keys ---------------------------------------------------------------------------

    async def for_epochs(self, conn: Any, epochs: list[int]) -> dict[int, bytes]:
        """The keys of ``epochs``, made where missing; their rows stay locked (FOR SHARE) until
        ``conn``'s transaction ends, so that no node destroys a key this commit seals under."""
        ring = self.ring
        query = (
            "SELECT epoch, kek_version, wrapped FROM storage_keys "
            "WHERE epoch = ANY($1::bigint[]) ORDER BY epoch FOR SHARE"
        )
        rows = list(await conn.fetch(query, epochs))
        missing = sorted(set(epochs) - {int(r[0]) for r in rows})
        if missing:
            version = max(ring.version, ring.version_at(self._wall()))
            wrapped = [
                ring.wrap(self._random(KEY_BYTES), e, version, self._random(NONCE_BYTES))
                for e in missing
            ]
            # A concurrent creator (another node) is waited for and wins; its key is used.
            await conn.execute(
                "INSERT INTO storage_keys(epoch, kek_version, wrapped) SELECT e, $2, w "
                "FROM unnest($1::bigint[], $3::bytea[]) AS t(e, w) ON CONFLICT DO NOTHING",
                missing,
                version,
                wrapped,
            )
            rows += await conn.fetch(query, missing)
        return {int(r[0]): self.unwrap(int(r[0]), int(r[1]), bytes(r[2])) for r in rows}

    def unwrap(self, epoch: int, version: int, wrapped: bytes) -> bytes:
        cached = self._cache.get((epoch, version, wrapped))
        if cached is None:
            if len(self._cache) >= _CACHE:
                self._cache.clear()
            cached = self.ring.unwrap(wrapped, epoch, version)
            self._cache[(epoch, version, wrapped)] = cached
        return cached

    async def destroy_empty(self, pool: Any) -> int:
        """Delete the key of every epoch with no envelope left; how many went. Keys a commit
        is sealing under are locked (FOR SHARE) and skipped; the emptiness test runs after the
        locks are held, so it sees every commit that sealed under them."""
        async with pool.acquire() as conn, conn.transaction():
            locked = await conn.fetch(
                "SELECT epoch FROM storage_keys ORDER BY epoch FOR UPDATE SKIP LOCKED"
            )
            gone = _rowcount(
                await conn.execute(
                    "DELETE FROM storage_keys k WHERE k.epoch = ANY($1::bigint[]) "
                    "AND NOT EXISTS (SELECT 1 FROM envelopes e WHERE e.epoch = k.epoch)",
                    [int(r[0]) for r in locked],
                )
            )
        if gone:
            self._cache.clear()
        return gone

    def rotation_due(self) -> bool:
        ring = self.ring
        return ring.version < ring.version_at(self._wall()) - 1

    async def rotate(self, pool: Any) -> int:
        """Re-wrap the live epoch keys under the current KEK version, then advance the key
        file to the oldest version any of them (or the check value) still uses, at most one
        behind the current: the grace for nodes whose clocks lag. Returns the file's version."""
        ring = self.ring
        current = max(ring.version, ring.version_at(self._wall()))
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT epoch, kek_version, wrapped FROM storage_keys WHERE kek_version < $1 "
                "ORDER BY epoch FOR UPDATE SKIP LOCKED",
                current,
            )
            if rows:
                await conn.execute(
                    "UPDATE storage_keys s SET kek_version = $1, wrapped = t.w "
                    "FROM unnest($2::bigint[], $3::bytea[]) AS t(e, w) WHERE s.epoch = t.e",
                    current,
                    [int(r[0]) for r in rows],
                    [
                        ring.wrap(
                            self.unwrap(int(r[0]), int(r[1]), bytes(r[2])),
                            int(r[0]),
                            current,
                            self._random(NONCE_BYTES),
                        )
                        for r in rows
                    ],
                )
            await conn.execute(
                "UPDATE storage_check SET kek_version = $1, sealed = $2 WHERE kek_version < $1",
                current,
                check_value(ring, current, self._random(NONCE_BYTES)),
            )
            oldest = await conn.fetchval(
                "SELECT MIN(v) FROM (SELECT kek_version AS v FROM storage_keys "
                "UNION ALL SELECT kek_version FROM storage_check) AS versions"
            )
        target = min(current - 1, int(oldest if oldest is not None else current))
        self._ring = KeyFile(self.path).advance(target).advanced(target)
        self._cache.clear()
        return self._ring.version


async def _rename_older_rows(conn: Any, ring: KeyRing) -> None:
    """Rows written before the database had storage keys: licences keyed by their plain hash,
    envelopes and counters by device ID, renamed to their tags and mailbox names."""
    plain = [bytes(r[0]) for r in await conn.fetch("SELECT code_hash FROM licences")]
    await conn.execute(
        "UPDATE licences l SET code_hash = t.tag "
        "FROM unnest($1::bytea[], $2::bytea[]) AS t(h, tag) WHERE l.code_hash = t.h",
        plain,
        [ring.licence_tag(h) for h in plain],
    )
    for table in ("envelopes", "device_seq"):
        named = [str(r[0]) for r in await conn.fetch(f"SELECT DISTINCT device_id FROM {table}")]
        await conn.execute(
            f"UPDATE {table} x SET device_id = t.m FROM unnest($1::text[], "
            "$2::text[]) AS t(d, m) WHERE x.device_id = t.d",
            named,
            [ring.mailbox(d) for d in named],
        )
