"""A full copy of the server's data folder reveals no plaintext and no sender of any envelope."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from kluis.audit import store_footprint
from tests.kluis_testing import ServerProcess, link_device, register

MARKERS = ["SEIZE-MARKER-alpha-7f3a", "SEIZE-MARKER-bravo-91c2", "SEIZE-MARKER-charlie-d0e4"]


def all_bytes(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


async def test_data_folder_holds_no_plaintext_and_no_sender(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    alice2 = await link_device(alice, server, tmp_path / "alice2")
    carol = await register(server, tmp_path / "carol")
    carol_id = carol.account_id
    await carol.close()  # offline: her envelopes stay stored

    await alice.send(bob.account_id, MARKERS[0])
    await bob.send(alice.account_id, MARKERS[1])
    await alice2.send(carol_id, MARKERS[2])  # pending for Carol when the disk is copied
    await bob.receive(wait=5, until=1)
    await alice.receive(wait=5, until=2)
    await alice2.receive(wait=5, until=2)
    for c in (bob, alice, alice2):  # the delivered receipts those receives answered with
        await c.receive(wait=1)

    files = all_bytes(server.data)  # database, WAL, shared memory, logs: every file
    footprint = store_footprint(server.data)  # the store's files, asked of the store
    assert footprint[0] in files
    assert {p for p in footprint if p.exists()} <= set(files)
    for path, data in files.items():
        for marker in MARKERS:
            for encoded in (marker.encode(), marker.encode("utf-16-le")):
                assert encoded not in data, f"plaintext {marker!r} found in {path}"

    db = sqlite3.connect(footprint[0])
    columns = [r[1] for r in db.execute("PRAGMA table_info(envelopes)")]
    assert columns == ["device_id", "seq", "expires_at", "body", "size"]  # no sender column
    rows = db.execute("SELECT device_id, body FROM envelopes").fetchall()
    db.close()
    # Only Carol's envelope outlives delivery; delivered ones are deleted.
    assert [r[0] for r in rows] == [carol.core.device_id]
    senders = [alice.account_id, alice.core.device_id, alice2.core.device_id]
    for _, body in rows:
        for secret in senders + MARKERS:
            assert secret.encode() not in body
            assert secret.encode() not in body.hex().encode()
    for c in (alice, alice2, bob):
        await c.close()


async def test_profile_folder_is_encrypted_at_rest(server: ServerProcess, tmp_path: Path) -> None:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    await alice.send(bob.account_id, MARKERS[0])
    await bob.receive(wait=5, until=1)
    for c in (alice, bob):
        await c.close()
    for profile in (tmp_path / "alice", tmp_path / "bob"):
        for path, data in all_bytes(profile).items():
            for secret in (MARKERS[0], alice.account_id, bob.account_id):
                assert secret.encode() not in data, f"{secret!r} in {path}"
