"""A real ``kluis serve --database postgresql://...`` process: two clients exchange messages,
the store is PostgreSQL (nothing on SQLite), and a killed server loses nothing it accepted."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from kluis.client.client import KluisClient
from tests.kluis_testing import PASSPHRASE, ServerProcess, register
from tests.postgres import scratch_database


class PostgresServerProcess(ServerProcess):
    """`kluis serve --database URL`; licence codes from `kluis licence create --database URL`."""

    def __init__(self, data: Path, database_url: str) -> None:
        # Nodes of one deployment share the storage key file (here: beside their data folders).
        self.key_file = data.parent / "storage.key"
        super().__init__(data, "--database", database_url, "--storage-key-file", str(self.key_file))
        self.database_url = database_url

    def licences(self, count: int = 1, days: int = 182) -> list[str]:
        out = subprocess.run(
            self.cli(
                "licence",
                "create",
                "--database",
                self.database_url,
                "--storage-key-file",
                str(self.key_file),
                "--count",
                str(count),
                "--days",
                str(days),
            ),
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.split()


@pytest.fixture
def pg_server(tmp_path: Path) -> Iterator[PostgresServerProcess]:
    with scratch_database() as url:
        srv = PostgresServerProcess(tmp_path / "server", url)
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


async def count_rows(url: str, sql: str, *args: object) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(f"SELECT COUNT(*) FROM {sql}", *args))
    finally:
        await conn.close()


async def test_two_clients_talk_through_a_server_on_postgres(
    pg_server: PostgresServerProcess, tmp_path: Path
) -> None:
    alice = await register(pg_server, tmp_path / "alice")
    bob = await register(pg_server, tmp_path / "bob")
    assert await count_rows(pg_server.database_url, "accounts") == 2
    assert await count_rows(pg_server.database_url, "licences") == 0  # redeemed: gone

    await alice.send(bob.account_id, "hello bob")
    assert [m.text for m in await bob.receive(wait=5, until=1)] == ["hello bob"]
    await bob.send(alice.account_id, "hello alice")
    assert [m.text for m in await alice.receive(wait=5, until=1)] == ["hello alice"]

    # Accepted is durable: the server dies before Bob connects again; nothing is lost.
    await bob.close()
    sent = [f"durable {i}" for i in range(5)]
    for text in sent:
        await alice.send(bob.account_id, text)
    await alice.close()
    pg_server.kill()
    pg_server.start()
    bob = KluisClient.open(tmp_path / "bob", PASSPHRASE)
    await bob.connect()
    assert [m.text for m in await bob.receive(wait=5, until=len(sent))] == sent
    await bob.close()
    await asyncio.sleep(0.2)  # the acknowledgement's group commit
    # Bob's mailbox is empty (Alice's holds Bob's delivery receipts until she connects).
    bobs = "envelopes e JOIN devices d ON d.id = e.device_id WHERE d.account_id = $1"
    assert await count_rows(pg_server.database_url, bobs, bob.account_id) == 0
    assert await count_rows(pg_server.database_url, "envelopes") > 0
    assert not (pg_server.data / "kluis.sqlite3").exists()  # the store is not on SQLite


def test_a_node_on_postgres_makes_its_data_folder(tmp_path: Path) -> None:
    """`kluis serve --database URL --data NEW` makes NEW (owner only) for its own files (the
    console's admin.key, attachments, the storage key file): a fresh node must not crash."""
    with scratch_database() as url:
        node = PostgresServerProcess(tmp_path / "new" / "data", url)
        proc = subprocess.Popen(
            node.cli(
                *("serve", "--data", str(node.data), "--port", str(node.port)),
                *("--database", url, "--storage-key-file", str(tmp_path / "storage.key")),
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{node.port}/healthz", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            assert proc.poll() is None, proc.communicate()[1]
            assert stat.S_IMODE(node.data.stat().st_mode) == 0o700
        finally:
            proc.terminate()
            proc.communicate(timeout=20)
