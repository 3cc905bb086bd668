"""Storage keys on PostgreSQL (``server/store/sealing.py``): the rows alone open nothing, a
destroyed epoch key leaves its envelopes unreadable, and KEK rotation keeps undelivered envelopes
deliverable across two nodes sharing one key file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from kluis.errors import StorageKeyError
from kluis.server.store.postgres import MIGRATIONS, PostgresStore
from kluis.server.store.sealing import KeyFile, KeyRing, epoch_of, open_body
from tests.postgres import scratch_database
from tests.store.test_contract import record

NOW = 1_800_000_000
LATER = NOW + 86_400
PERIOD = 3600
BODY = b"ciphertext the client sent \x00\x01" * 20


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def url() -> Iterator[str]:
    with scratch_database() as found:
        yield found


def node(url: str, key_file: Path, clock: Clock) -> PostgresStore:
    return PostgresStore(url, key_file=key_file, key_period_s=PERIOD, wall_clock=clock, clock=clock)


async def rows(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def test_a_copy_of_the_rows_without_the_key_file_opens_nothing(
    url: str, tmp_path: Path
) -> None:
    clock = Clock(NOW)
    store = node(url, tmp_path / "storage.key", clock)
    await store.add_licences([b"code-hash"], 30, NOW)
    [seq] = await store.write_envelopes([("dev-b", LATER, BODY)], [])
    await store.close()

    dump = await rows(url, "SELECT * FROM envelopes")
    keys = await rows(url, "SELECT * FROM storage_keys")
    assert len(dump) == 1 and len(keys) == 1
    everything = repr(
        [dict(r) for r in dump + keys]
        + [dict(r) for r in await rows(url, "SELECT * FROM licences")]
    ).encode()
    assert BODY[:20] not in everything and b"code-hash" not in everything
    assert b"dev-b" not in everything  # envelopes and counters are kept under mailbox names
    assert (
        b"dev-b"
        not in repr([dict(r) for r in await rows(url, "SELECT * FROM device_seq")]).encode()
    )
    # The body is sealed; its stored size is the client's, not the sealed one.
    assert BODY not in bytes(dump[0]["body"]) and dump[0]["size"] == len(BODY)

    # Another deployment's key file (a thief's guess) neither unwraps the key nor opens a node.
    other = KeyRing.new(NOW, PERIOD, lambda n: b"\x07" * n)
    with pytest.raises(StorageKeyError) as caught:
        other.unwrap(bytes(keys[0]["wrapped"]), int(keys[0]["epoch"]), int(keys[0]["kek_version"]))
    assert caught.value.code == "storage_key"
    KeyFile(tmp_path / "thief.key").create(other)
    thief = node(url, tmp_path / "thief.key", clock)
    with pytest.raises(StorageKeyError, match="not this database's"):
        await thief.envelopes_after("dev-b", 0, NOW, 10)
    await thief.close()
    # No file at all, on a database that has keys: refused, not created afresh.
    lost = node(url, tmp_path / "missing" / "storage.key", clock)
    with pytest.raises(StorageKeyError, match="copy it from another node"):
        await lost.open()
    await lost.close()
    assert not (tmp_path / "missing" / "storage.key").exists()

    # With the right file, the same rows open: the copy above was the real thing.
    ring = KeyFile(tmp_path / "storage.key").load()
    data_key = ring.unwrap(
        bytes(keys[0]["wrapped"]), int(keys[0]["epoch"]), int(keys[0]["kek_version"])
    )
    assert open_body(data_key, "dev-b", seq, epoch_of(LATER), bytes(dump[0]["body"])) == BODY


async def test_a_destroyed_epoch_key_leaves_its_envelopes_unreadable(
    url: str, tmp_path: Path
) -> None:
    clock = Clock(NOW)
    store = node(url, tmp_path / "storage.key", clock)
    [a] = await store.write_envelopes([("dev-a", LATER, BODY)], [])
    [b] = await store.write_envelopes([("dev-b", LATER + 4 * 3600, b"other epoch")], [])
    # A seizer's copy of the delivered envelope's row and of its (live) epoch key.
    mailbox = KeyFile(tmp_path / "storage.key").load().mailbox("dev-a")
    [copy] = await rows(url, f"SELECT * FROM envelopes WHERE device_id = '{mailbox}'")
    [wrapped] = await rows(url, f"SELECT * FROM storage_keys WHERE epoch = {epoch_of(LATER)}")

    # Delivered: its epoch has no envelope left, so its key goes; the other epoch's stays.
    await store.write_envelopes([], [("dev-a", a)])
    await store.maintenance()
    assert [int(r[0]) for r in await rows(url, "SELECT epoch FROM storage_keys")] == [
        epoch_of(LATER + 4 * 3600)
    ]
    assert await store.envelopes_after("dev-b", 0, NOW, 10) == [(b, b"other epoch")]

    # Two KEK periods later every node has re-wrapped and moved its key file on: the copied
    # wrapped key no longer opens, even with the key file in hand.
    clock.t += 2 * PERIOD
    await store.maintenance()
    ring = KeyFile(tmp_path / "storage.key").load()
    assert ring.version == ring.version_at(clock.t) - 1
    with pytest.raises(StorageKeyError, match="is gone"):
        ring.unwrap(bytes(wrapped["wrapped"]), int(wrapped["epoch"]), int(wrapped["kek_version"]))
    assert BODY not in bytes(copy["body"])

    # A key destroyed while envelopes remain (what expiry does): they are never handed out.
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DELETE FROM storage_keys")
    finally:
        await conn.close()
    assert await store.envelopes_after("dev-b", 0, NOW, 10) == []
    await store.close()


async def test_rotation_keeps_envelopes_deliverable_across_two_nodes_sharing_the_key_file(
    url: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "shared" / "storage.key"
    clock_a, clock_b = Clock(NOW), Clock(NOW - 30)  # b's clock lags half a minute
    node_a, node_b = node(url, key_file, clock_a), node(url, key_file, clock_b)
    await node_a.open()
    await node_b.open()  # reads the file a made
    first = KeyFile(key_file).load().version

    sent: dict[str, list[tuple[int, bytes]]] = {"dev-a": [], "dev-b": []}
    for hour in range(5):
        for writer, device in ((node_a, "dev-b"), (node_b, "dev-a")):
            body = f"hour {hour} to {device}".encode()
            [seq] = await writer.write_envelopes([(device, LATER + hour * 3600, body)], [])
            sent[device].append((seq, body))
        for clock in (clock_a, clock_b):
            clock.t += PERIOD
        await node_a.maintenance()  # a rotates; b, behind, does it a moment later or not
        if hour % 2:
            await node_b.maintenance()
        # Both read everything the other sealed, whatever version it is wrapped under.
        for reader in (node_a, node_b):
            for device, expected in sent.items():
                assert await reader.envelopes_after(device, 0, NOW, 100) == expected

    ring = KeyFile(key_file).load()
    assert ring.version >= first + 4  # the file moved on: old KEKs are overwritten
    versions = {int(r[0]) for r in await rows(url, "SELECT kek_version FROM storage_keys")}
    assert min(versions) >= ring.version  # every live key re-wrapped under a kept version
    # A node started afresh from the advanced file reads everything too.
    fresh = node(url, key_file, Clock(clock_a.t))
    for device, expected in sent.items():
        assert await fresh.envelopes_after(device, 0, NOW, 100) == expected
    for store in (node_a, node_b, fresh):
        await store.close()


def test_the_key_file_is_private_well_formed_and_only_moves_forward(tmp_path: Path) -> None:
    path = tmp_path / "storage.key"
    draws = iter(range(1, 100))
    ring = KeyFile(path).create(KeyRing.new(NOW, PERIOD, lambda n: bytes([next(draws)]) * n))
    assert path.stat().st_mode & 0o777 == 0o600
    assert KeyFile(path).create(KeyRing.new(NOW, PERIOD, lambda n: b"\x02" * n)) == ring
    later = KeyFile(path).advance(ring.version + 3)
    assert KeyFile(path).load() == later and later.kek(later.version) == ring.kek(ring.version + 3)
    with pytest.raises(StorageKeyError, match="is gone"):
        later.kek(ring.version)
    assert path.read_bytes().count(ring.key.hex().encode()) == 0  # overwritten in place
    path.chmod(0o644)
    with pytest.raises(StorageKeyError, match="readable by others"):
        KeyFile(path).load()
    path.chmod(0o600)
    path.write_bytes(b"kluis-storage-key v1\nnonsense\n")
    with pytest.raises(StorageKeyError, match="format"):
        KeyFile(path).load()


async def test_a_database_from_before_the_storage_keys_is_renamed_at_first_start(
    url: str, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(url)
    try:  # the schema of migrations 1 and 2, with a licence, an envelope and its counter
        await conn.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)"
        )
        for version, sql in MIGRATIONS[:2]:
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_version VALUES ($1, 0)", version)
        await conn.execute("INSERT INTO licences(code_hash, days, created_at) VALUES ('h', 30, 0)")
        await conn.execute("INSERT INTO envelopes VALUES ('ed-old', 41, $1, 'old body')", LATER)
        await conn.execute("INSERT INTO device_seq VALUES ('ed-old', 41)")
    finally:
        await conn.close()

    store = node(url, tmp_path / "storage.key", Clock(NOW))
    assert await store.envelopes_after("ed-old", 0, NOW, 10) == [(41, b"old body")]
    assert await store.write_envelopes([("ed-old", LATER, b"new body")], []) == [42]
    assert await store.envelope_bytes("ed-old") == len(b"old body") + len(b"new body")
    assert await store.renew(b"h", "nobody", NOW) is None  # no such account, but:
    account = await store.register(b"h", "acc", "id", record("old"), NOW)
    assert account is not None  # the plain hash was renamed to its tag, and still redeems
    names = repr([dict(r) for r in await rows(url, "SELECT * FROM device_seq")])
    assert "ed-old" not in names
    await store.close()
