"""The seizure promise on PostgreSQL: real clients over a real ``kluis serve --database`` node,
then ``kluis audit-storage --pgdata`` reads the PostgreSQL server's data directory raw, after a
CHECKPOINT, as a thief would.

A copy of the data directory alone holds no delivered envelope (the ciphertexts the clients
sent), no redeemed licence code (nor its hash), no sender-recipient pair (no tuple and no
transaction names devices of two accounts) and no storage key; with the nodes' key file too,
only what SECURITY.md says such a thief gets (mailbox names, licence tags). The audit is shown
to find a planted ciphertext and a planted pair.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from kluis.audit import Report
from kluis.audit.postgres import audit_postgres
from kluis.client.client import KluisClient
from kluis.server.store.sealing import KeyFile, KeyRing
from tests.integration.test_audit_storage import record_bodies
from tests.integration.test_postgres_server import PostgresServerProcess
from tests.kluis_testing import (
    PASSPHRASE,
    fast_kdf,
    free_port,
    link_device,
    transport_factory,
)
from tests.postgres import ADMIN_URL, scratch_database


class Node(PostgresServerProcess):
    """Keeps the licence codes it handed out: the audit looks for the redeemed ones."""

    codes: list[str]

    def licences(self, count: int = 1, days: int = 182) -> list[str]:
        made = super().licences(count, days)
        self.codes = [*getattr(self, "codes", []), *made]
        return made


async def _admin(sql: str) -> str:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        return str(await conn.fetchval(sql) or "")
    finally:
        await conn.close()


async def count(url: str, table: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(f"SELECT COUNT(*) FROM {table}"))
    finally:
        await conn.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    with scratch_database() as url:
        srv = Node(tmp_path / "server", url)
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


async def register(node: Node, profile: Path) -> KluisClient:
    (code,) = node.licences(1)
    return await KluisClient.register(
        node.url,
        code,
        profile,
        PASSPHRASE,
        transport_factory=transport_factory(node),
        kdf=fast_kdf(),
    )


def run_audit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kluis.apps.cli", "audit-storage", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, KLUIS_PASSPHRASE=PASSPHRASE),
        timeout=120,
    )


async def test_a_copy_of_the_postgresql_data_directory_holds_nothing_delivered(
    node: Node, tmp_path: Path
) -> None:
    pgdata = Path(await _admin("SHOW data_directory"))
    if not os.access(pgdata / "base", os.R_OK):
        pytest.skip(f"the PostgreSQL data directory {pgdata} is not readable here")
    markers = [f"MARKER-{secrets.token_hex(6)}", f"geheim {secrets.token_hex(6)}"]
    alice = await register(node, tmp_path / "alice")
    bob = await register(node, tmp_path / "bob")
    alice2 = await link_device(alice, node, tmp_path / "alice2")
    bodies: list[bytes] = []
    for c in (alice, bob, alice2):
        record_bodies(c, bodies)
    await alice.send(bob.account_id, f"{markers[0]} from alice")
    await bob.send(alice.account_id, f"{markers[1]} from bob")
    assert len(await bob.receive(wait=5, until=1)) == 1
    assert len(await alice.receive(wait=5, until=1)) == 1
    assert len(await alice2.receive(wait=5, until=2)) == 2
    for c in (bob, alice, alice2):  # the delivered receipts
        await c.receive(wait=1)
    for c in (alice, bob, alice2):
        assert c.errors == []
        await c.close()
    assert len(bodies) >= 4
    # The last acknowledgements' commit, then the node's key sweep (within about a second).
    deadline = time.monotonic() + 15
    while await count(node.database_url, "storage_keys") + await count(
        node.database_url, "envelopes"
    ):
        assert time.monotonic() < deadline, "the node kept an envelope or a storage key"
        await asyncio.sleep(0.2)
    await _admin("CHECKPOINT")  # what is in the files now is what a thief takes

    args = ["--data", str(node.data), "--database", node.database_url, "--pgdata", str(pgdata)]
    args += ["--expect-empty"]  # everything was delivered
    for m in markers:
        args += ["--marker", m]
    for b in bodies:
        args += ["--bytes", b[33:97].hex()]  # 64 bytes of each ciphertext a client sent
    for code in node.codes:
        args += ["--licence", code]
    out = run_audit(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ", 0 findings" in out.stdout
    assert "heap tuples (live and dead) parsed" in out.stdout
    # Every storage key is gone: each epoch's envelopes were all delivered.
    assert "0 stored envelopes; 0 live storage keys" in out.stdout

    # With the key file too: no key-encryption key, index key or live storage key is in
    # PostgreSQL's files; what such a thief may find is flagged as needing the file.
    out = run_audit(*args, "--storage-key-file", str(node.key_file))
    assert "the key file's keys and the live storage keys" in out.stdout, out.stdout + out.stderr
    found = [line for line in out.stdout.splitlines() if line.startswith("FOUND")]
    assert all("needs the key file" in line for line in found), found

    # The audit does find things: a ciphertext and a pair planted in one transaction.
    ring = KeyFile(node.key_file).load()
    conn = await asyncpg.connect(node.database_url)
    try:
        async with conn.transaction():
            await conn.execute("CREATE TABLE planted (x BYTEA)")
            await conn.execute("INSERT INTO planted VALUES ($1)", bodies[0])
            for who in (bob, alice2):
                await conn.execute("INSERT INTO planted VALUES ($1)", who.core.device_id.encode())
    finally:
        await conn.close()
    await _admin("CHECKPOINT")
    report = Report()
    await asyncio.to_thread(
        functools.partial(
            audit_postgres,
            report,
            node.database_url,
            pgdata,
            raw=[("delivered envelope", bodies[0][33:97])],
            key_file=node.key_file,
        )
    )
    kinds = {f.kind for f in report.findings}
    assert {"marker", "deposit"} <= kinds, report.findings
    assert any("pairing them" in f.detail and "key file" not in f.detail for f in report.findings)
    assert ring.mailbox(bob.core.device_id) not in str(report.findings)  # no name is printed


def test_a_node_without_this_databases_key_file_refuses_to_start(tmp_path: Path) -> None:
    with scratch_database() as url:
        first = Node(tmp_path / "one", url)
        first.start()  # makes tmp_path/storage.key and seals the database under it
        first.stop()

        def serve(key_file: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [
                    *first.cli("serve", "--data", str(tmp_path / "two"), "--database", url),
                    *("--port", str(free_port()), "--storage-key-file", str(key_file)),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )

        missing = serve(tmp_path / "elsewhere" / "storage.key")
        assert missing.returncode != 0 and "copy it from another node" in missing.stderr
        assert not (tmp_path / "elsewhere" / "storage.key").exists()
        KeyFile(tmp_path / "other.key").create(KeyRing.new(time.time(), 3600, os.urandom))
        wrong = serve(tmp_path / "other.key")
        assert wrong.returncode != 0 and "is not this database's" in wrong.stderr
        out = subprocess.run(
            first.cli("licence", "create", "--database", url), capture_output=True, text=True
        )
        assert out.returncode != 0 and "needs --storage-key-file" in out.stderr
        out = run_audit("--data", str(tmp_path), "--database", url, "--pgdata", str(tmp_path))
        assert out.returncode != 0 and "is not a PostgreSQL data directory" in out.stderr
