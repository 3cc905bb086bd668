"""`kluis audit-storage` after a realistic workload: a seized disk shows nothing worth taking.

Workload: two accounts, one with a second device, messages both ways with known marker strings,
everything delivered and acknowledged. Then the audit looks through the server's data folder and
its log for the markers (in several encodings), for the ciphertexts of delivered envelopes, for
the private keys of every client profile, for anything shaped like a private key, and for rows
linking two accounts; it must come back clean. A marker planted afterwards must be found.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kluis import audit
from kluis.client.client import KluisClient
from kluis.protocol import frames as f
from tests.kluis_testing import PASSPHRASE, ServerProcess, link_device, register

MARKERS = ["MARKER-tulip-7731", "geheim bericht 0x5eed", "Ünïcødé-marker-✓"]


def database(data: Path) -> Path:
    """The database of a server on ``data``: the main file of its store's footprint."""
    return audit.store_footprint(data)[0]


def run_audit(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KLUIS_PASSPHRASE=PASSPHRASE)
    return subprocess.run(
        [sys.executable, "-m", "kluis.apps.cli", "audit-storage", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def record_bodies(client: KluisClient, into: list[bytes]) -> None:
    """Keep the ciphertext of every envelope the client opens (to look for it on disk later)."""
    core = client.core
    original = core.open_envelope

    def spy(env: f.InEnvelope) -> object:
        into.append(env.body)
        return original(env)

    core.open_envelope = spy  # type: ignore[method-assign,assignment]


async def workload(server: ServerProcess, tmp_path: Path) -> tuple[list[Path], list[bytes]]:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    alice2 = await link_device(alice, server, tmp_path / "alice2")
    bodies: list[bytes] = []
    for c in (alice, bob, alice2):
        record_bodies(c, bodies)
    await alice.send(bob.account_id, f"{MARKERS[0]} from alice")
    await bob.send(alice.account_id, f"{MARKERS[1]} from bob")
    await alice2.send(bob.account_id, f"{MARKERS[2]} from the laptop")
    assert len(await bob.receive(wait=5, until=2)) == 2
    assert len(await alice.receive(wait=5, until=2)) == 2
    assert len(await alice2.receive(wait=5, until=2)) == 2
    for c in (bob, alice, alice2):  # the delivered receipts each receive answered with
        assert await c.receive(wait=1) == []
    for c in (alice, bob, alice2):
        assert c.errors == []
        await c.close()
    assert len(bodies) >= 6 + 3  # the messages, our copies and at least three receipts
    return [tmp_path / "alice", tmp_path / "bob", tmp_path / "alice2"], bodies


def audit_args(server: ServerProcess, profiles: list[Path], bodies: list[bytes]) -> list[str]:
    args = ["--data", str(server.data), "--also", str(server.log_path), "--expect-empty"]
    for m in MARKERS:
        args += ["--marker", m]
    for b in bodies:
        args += ["--bytes", b[33:97].hex()]  # 64 bytes of the sealed ciphertext
    for p in profiles:
        args += ["--profile", str(p)]
    return args


@pytest.mark.parametrize("how", ["stopped", "killed"])
async def test_seized_disk_after_workload_is_clean(
    server: ServerProcess, tmp_path: Path, how: str
) -> None:
    profiles, bodies = await workload(server, tmp_path)
    if how == "stopped":
        server.stop()  # a clean stop folds the WAL into the database
    else:
        # Plug pulled: deleted envelopes' old copies sit in the WAL until the next checkpoint,
        # which the server runs within checkpoint_interval_s (1 s) of a deletion.
        time.sleep(2.0)
        server.kill()
    out = run_audit(*audit_args(server, profiles, bodies))
    assert out.returncode == 0, out.stdout + out.stderr
    assert ", 0 findings" in out.stdout
    if how == "killed":
        return

    # The audit does see things: a planted marker in a new row, in UTF-16, is found.
    db = sqlite3.connect(database(server.data))
    db.execute("CREATE TABLE planted (x BLOB)")
    db.execute("INSERT INTO planted VALUES (?)", (MARKERS[1].encode("utf-16-le"),))
    db.commit()
    db.close()
    out = run_audit("--data", str(server.data), "--marker", MARKERS[1])
    assert out.returncode == 1, out.stdout
    assert f"marker {MARKERS[1]!r} (utf-16-le)" in out.stdout


async def test_audit_finds_leaks_of_each_kind(server: ServerProcess, tmp_path: Path) -> None:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    await alice.close()
    await bob.close()
    server.stop()
    db = sqlite3.connect(database(server.data))
    # A row linking two accounts, an undelivered envelope, a pickle-like blob, a log with a key.
    db.execute("CREATE TABLE leak (sender TEXT, recipient TEXT)")
    db.execute("INSERT INTO leak VALUES (?, ?)", (alice.account_id, bob.account_id))
    db.execute(
        "INSERT INTO envelopes(device_id, expires_at, body) VALUES (?, ?, ?)",
        ("dev", 0, b"x"),
    )
    db.execute("INSERT INTO leak VALUES (?, ?)", ("A" * 600, ""))
    db.commit()
    db.close()
    (seal_label, seal_key), *_ = audit.profile_secrets(tmp_path / "alice", PASSPHRASE)
    (server.data / "debug.log").write_text(f"key={seal_key.hex()}\n")

    out = run_audit("--data", str(server.data), "--profile", str(tmp_path / "alice"))
    assert out.returncode == 1
    assert "FOUND link: row names IDs of 2 different accounts" in out.stdout
    assert "FOUND envelope: 1 expired envelopes kept for dev" in out.stdout
    assert "base64 run" in out.stdout
    assert f"FOUND key: {seal_label} (hex)" in out.stdout


def test_audit_refuses_postgresql_and_missing_folders(tmp_path: Path) -> None:
    out = run_audit("--data", str(tmp_path), "--database", "postgresql://localhost/kluis")
    assert out.returncode == 1
    assert "needs --pgdata DIR" in out.stderr
    out = run_audit("--data", str(tmp_path / "nope"))
    assert out.returncode == 1
    assert "no data folder" in out.stderr
    out = run_audit("--data", str(tmp_path), "--database", f"sqlite:///{tmp_path}/elsewhere.db")
    assert out.returncode == 0, out.stdout
    assert f"note: no database at {tmp_path}/elsewhere.db" in out.stdout


@pytest.mark.parametrize("shift", [0, 1, 2])
def test_marker_encodings_are_found_inside_larger_streams(shift: int) -> None:
    import base64

    text = "needle-in-the-haystack"
    forms = audit.encodings(text)
    stream = base64.b64encode(os.urandom(shift) + text.encode() + os.urandom(5))
    assert any(form in stream for form in forms["base64"])


async def test_a_redeemed_licence_is_not_tied_to_its_account(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A reseller knows which code went to whom; the seized disk must not say which account it
    became. Before: the code's hash stayed with a redemption time equal to the account's
    creation time."""
    from kluis.client.client import KluisClient
    from kluis.server.accounts import licence_hash

    (code,) = server.licences(1)
    client = await KluisClient.register(server.url, code, tmp_path / "buyer", PASSPHRASE)
    await client.close()
    time.sleep(2.0)  # one checkpoint interval: the deletion reaches the WAL too
    server.kill()
    out = run_audit("--data", str(server.data), "--bytes", licence_hash(code).hex())
    assert out.returncode == 0, out.stdout
    db = sqlite3.connect(database(server.data))
    assert db.execute("SELECT COUNT(*) FROM licences").fetchone() == (0,)
    db.close()


async def test_pending_envelopes_are_reported(server: ServerProcess, tmp_path: Path) -> None:
    """Undelivered envelopes are no finding by themselves (they wait for their device), but the
    audit lists them and, with --expect-empty (every device has synced), counts each as a
    finding. The recipient's envelope and the sender's copy for another device, deposited
    together, are not paired by their order or expiry (random row ids, whole-hour expiries)."""
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    alice2 = await link_device(alice, server, tmp_path / "alice2")
    await alice2.close()
    await bob.close()
    await alice.send(bob.account_id, "waiting for bob")  # one for bob, a copy for alice2
    await alice.close()
    server.stop()
    out = run_audit("--data", str(server.data), "--marker", "waiting for bob")
    assert out.returncode == 0, out.stdout
    assert "note: 2 stored envelopes for 2 devices" in out.stdout
    assert "pairs of pending envelopes for different accounts" not in out.stdout
    out = run_audit("--data", str(server.data), "--expect-empty")
    assert out.returncode == 1
    assert out.stdout.count("envelopes still stored for") == 2


# ---- finding 8: deposit order on a seized disk ------------------------------------------------

# The envelopes table exactly as c4b3566's store created it (bodies inline, so a body longer than
# about 1,000 bytes spills into overflow pages allocated in insert order).
OLD_SCHEMA = """
CREATE TABLE accounts (id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL);
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    record BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE envelopes (
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,
    expires_at INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (device_id, seq)
) WITHOUT ROWID;
CREATE INDEX envelopes_by_expiry ON envelopes(expires_at);
"""
OLD_EXPIRY = 4_000_000_000 // 3600 * 3600  # a whole hour, far ahead


def open_old_layout(data: Path) -> sqlite3.Connection:
    """A database of c4b3566's layout with the same pragmas; two accounts of two devices each."""
    data.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(database(data), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA secure_delete=ON")
    db.executescript(OLD_SCHEMA)
    for name in ("alice", "bob"):
        # As long as a real account ID: the audit looks for every ID in every row, and 2 KB of
        # random body would now and then contain a 3-byte "bob".
        account = name.ljust(16, "x")
        db.execute("INSERT INTO accounts VALUES (?, 0, ?)", (account, OLD_EXPIRY))
        for n in (1, 2):
            device = f"{name}-device-{n}".ljust(43, "x")  # as long as a real device ID
            db.execute("INSERT INTO devices VALUES (?, ?, x'', 0, 0)", (device, account))
    return db


def old_send(db: sqlite3.Connection, seq: dict[str, int], sender: str, recipient: str) -> None:
    """One send as c4b3566's store wrote it: the recipient's envelope, then the sender's copy for
    its other device, 2 KB of random bytes each, in one transaction (one group commit)."""
    db.execute("BEGIN IMMEDIATE")
    for device in (f"{recipient}-device-1".ljust(43, "x"), f"{sender}-device-2".ljust(43, "x")):
        seq[device] = seq.get(device, 0) + 1
        db.execute(
            "INSERT INTO envelopes(device_id, seq, expires_at, body) VALUES (?, ?, ?, ?)",
            (device, seq[device], OLD_EXPIRY, os.urandom(2048)),
        )
    db.execute("COMMIT")


def copy_live(data: Path, into: Path) -> Path:
    """What a seizer copying the folder of a running server gets: the database, WAL and index."""
    into.mkdir(parents=True)
    for p in data.iterdir():
        (into / p.name).write_bytes(p.read_bytes())
    return into


async def test_finding8_audit_finds_deposit_pairing_in_old_layout_and_none_in_new(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Finding 8: on c4b3566's layout, a 2 KB envelope spills into an overflow page allocated in
    insert order, so a send's envelope for the recipient and the sender's copy for their other
    device sit on consecutive pages (and in one WAL commit while live). The new layout (chunks
    under the local-payload limit, scattered by key; the WAL folded within 1 s of a write) shows
    neither after a real workload, and a pair planted the old way is still found."""
    # Today's (old) layout, stopped: the pairs are on consecutive overflow pages.
    old = tmp_path / "old"
    db = open_old_layout(old)
    seq: dict[str, int] = {}
    for i in range(6):
        old_send(db, seq, *(("alice", "bob") if i % 2 else ("bob", "alice")))
    live = copy_live(old, tmp_path / "old-live")  # the connection is open: a live copy
    db.close()  # the last connection folds and removes the WAL
    out = run_audit("--data", str(old))
    assert out.returncode == 1, out.stdout + out.stderr
    # 12 overflow pages in deposit order; each send's two are neighbours for two accounts (the
    # sends alternate, so one send's last page and the next one's first are of one account).
    assert (
        "FOUND deposit: 6 times envelopes for different accounts sit in overflow pages that follow each other"
        in out.stdout
    ), out.stdout
    # ...and in the live copy, each send is one WAL commit as well.
    out = run_audit("--data", str(live))
    assert out.returncode == 1, out.stdout + out.stderr
    assert (
        "FOUND deposit: 6 times envelopes for different accounts sit in one WAL commit"
        in out.stdout
    ), out.stdout

    # The new layout, after a real workload: both users have a second device, every send of
    # 2 KB text leaves the recipients' envelopes and the sender's copy pending.
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    alice2 = await link_device(alice, server, tmp_path / "alice2")
    bob2 = await link_device(bob, server, tmp_path / "bob2")
    await alice2.close()
    await bob2.close()
    for i in range(4):
        await alice.send(bob.account_id, f"{i}:" + "a" * 2000)
        await bob.send(alice.account_id, f"{i}:" + "b" * 2000)
    for c in (alice, bob):
        await c.close()
    # Live, past the checkpoint interval (1 s): the WAL is folded and empty.
    time.sleep(2.5)
    live = copy_live(server.data, tmp_path / "new-live")
    db = sqlite3.connect(database(live))
    pending = db.execute("SELECT COUNT(*), MIN(size) FROM envelopes").fetchone()
    db.close()
    assert pending[0] >= 16 and pending[1] > 2000, pending  # 2 KB bodies, still waiting
    for folder in (live, server.data):
        if folder == server.data:
            server.stop()  # and stopped
        out = run_audit("--data", str(folder))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "FOUND" not in out.stdout
        assert "note: 0 overflow pages hold envelope bytes; 0 commits in the WAL" in out.stdout

    # The audit can fail on the new layout: two envelopes for different accounts written the
    # old way (whole bodies in their rows, one transaction) are found on consecutive pages.
    db = sqlite3.connect(database(server.data), isolation_level=None)
    db.execute("PRAGMA secure_delete=ON")
    db.execute("BEGIN")
    for device in (bob.core.device_id, alice2.core.device_id):
        db.execute(
            "INSERT INTO envelopes(device_id, seq, expires_at, body, size) VALUES (?, ?, ?, ?, ?)",
            (device, 10_000, OLD_EXPIRY, os.urandom(2048), 2048),
        )
    db.execute("COMMIT")
    db.close()
    out = run_audit("--data", str(server.data))
    assert out.returncode == 1, out.stdout
    assert (
        "FOUND deposit: 1 times envelopes for different accounts sit in overflow pages"
        in out.stdout
    ), out.stdout
