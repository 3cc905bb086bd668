"""The envelope layout of server/store/sqlite.py: no overflow pages, pieces gone with their envelope,
the old layout migrated, and the WAL's deposit order folded away by a checkpoint (finding 8)."""

from __future__ import annotations

import os
import sqlite3
import struct
from pathlib import Path

from kluis import audit
from kluis.protocol.frames import Revocation
from kluis.server.store.sqlite import SqliteDatabase
from tests.integration.test_audit_storage import OLD_EXPIRY, old_send, open_old_layout

RECIPIENT, COPY = "r" * 43, "s" * 43


def overflow_pages(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COUNT(*) FROM dbstat WHERE pagetype = 'overflow'").fetchone()[0])


def test_no_envelope_byte_goes_to_an_overflow_page_and_pieces_go_with_their_envelope(
    tmp_path: Path,
) -> None:
    store = SqliteDatabase(tmp_path / "db.sqlite3", seq_origin=lambda: 0)
    bodies = {n: os.urandom(n) for n in (0, 1, 900, 1_100, 2_048, 20_000, 100_000)}
    for body in bodies.values():
        store.insert_envelopes([(RECIPIENT, OLD_EXPIRY, body), (COPY, OLD_EXPIRY, body[::-1])])
    db = store._db
    assert overflow_pages(db) == 0
    # The mailbox's byte quota counts whole bodies, not the heads kept in the rows.
    assert store.envelope_bytes(RECIPIENT) == sum(len(b) for b in bodies.values())
    assert [b for _, b in store.envelopes_after(RECIPIENT, 0, 0, 100)] == list(bodies.values())
    assert db.execute("SELECT COUNT(*) FROM envelope_chunks").fetchone()[0] > 200

    assert store.delete_envelopes([(RECIPIENT, 5), (COPY, 5)]) == 2  # an ack: 2 KB bodies
    assert store.envelopes_after(RECIPIENT, 4, 0, 1)[0][0] == 6
    store.revoke_device(COPY, Revocation(device=COPY, sig="A" * 86))
    assert store.sweep(OLD_EXPIRY) == (6, 0)  # expiry
    assert db.execute("SELECT COUNT(*) FROM envelopes").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM envelope_chunks").fetchone()[0] == 0
    store.close()


def test_the_old_layout_is_migrated_on_open_without_losing_an_envelope(tmp_path: Path) -> None:
    db = open_old_layout(tmp_path)
    seq: dict[str, int] = {}
    for i in range(10):
        old_send(db, seq, *(("alice", "bob") if i % 2 else ("bob", "alice")))
    before = db.execute("SELECT device_id, seq, body FROM envelopes ORDER BY 1, 2").fetchall()
    db.close()
    assert not audit.audit(tmp_path).clean  # the pairing, before

    store = SqliteDatabase(audit.store_footprint(tmp_path)[0])
    after = [
        (device, n, body)
        for device in sorted(seq)
        for n, body in store.envelopes_after(device, 0, 0, 100)
    ]
    assert after == before
    assert overflow_pages(store._db) == 0
    assert store.insert_envelopes([("alice-device-1".ljust(43, "x"), OLD_EXPIRY, b"x")]) == [6]
    store.close()
    report = audit.audit(tmp_path)
    assert report.clean, [f.line() for f in report.findings]


def shm_pages(shm: Path) -> list[int]:
    """Page numbers the WAL index lists for its first frames (after its 136-byte header)."""
    return [p for p in struct.unpack("<64I", shm.read_bytes()[136 : 136 + 256]) if p]


def test_a_live_copy_shows_deposit_order_until_the_checkpoint_and_none_after(
    tmp_path: Path,
) -> None:
    """The residual window: before the checkpointer runs (at most checkpoint_interval_s after a
    write), the WAL holds the send as one commit; after it, neither the WAL nor the -shm index
    tells which pages the send wrote."""
    path = audit.store_footprint(tmp_path)[0]
    store = SqliteDatabase(path)
    store.checkpoint()
    for _ in range(3):
        with store.transaction():
            store.insert_envelopes(
                [(RECIPIENT, OLD_EXPIRY, os.urandom(2048)), (COPY, OLD_EXPIRY, os.urandom(2048))]
            )
    assert store.needs_checkpoint
    report = audit.audit(tmp_path)
    assert [f.kind for f in report.findings] == ["deposit"]
    assert "3 times envelopes for different accounts sit in one WAL commit" in (
        report.findings[0].detail
    )
    assert len(shm_pages(path.with_name(path.name + "-shm"))) > 6

    store.checkpoint()
    assert not store.needs_checkpoint
    assert path.with_name(path.name + "-wal").stat().st_size == 0
    assert len(shm_pages(path.with_name(path.name + "-shm"))) == 1  # the wal_scrub page only
    report = audit.audit(tmp_path)
    assert report.clean, [f.line() for f in report.findings]
    store.close()
