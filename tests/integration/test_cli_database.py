"""``kluis migrate`` and ``--database URL`` on the commands that take ``--data DIR``, against
scratch PostgreSQL databases and a real node; where a command cannot work on PostgreSQL yet, one
clear line and exit status 1."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kluis.client.client import KluisClient
from kluis.errors import AccountSuspended
from kluis.server.store.postgres import MIGRATIONS
from tests.integration.test_cli import kluis
from tests.integration.test_postgres_server import PostgresServerProcess, count_rows
from tests.kluis_testing import PASSPHRASE, register
from tests.postgres import scratch_database

LATEST = MIGRATIONS[-1][0]


def one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 1
    err = proc.stderr
    assert len(err.strip().splitlines()) == 1, err  # no traceback
    for fragment in fragments:
        assert fragment in err


def test_migrate_brings_a_postgres_database_to_the_latest_version_and_says_so() -> None:
    with scratch_database() as url:
        first = kluis("migrate", "--database", url)
        assert first.stdout == f"PostgreSQL schema at version {LATEST} (latest), was 0\n"
        again = kluis("migrate", "--database", url)
        assert again.stdout == f"PostgreSQL schema at version {LATEST} (latest): nothing to do\n"
        assert asyncio.run(count_rows(url, "schema_version")) == LATEST
        assert asyncio.run(count_rows(url, "accounts")) == 0  # the tables are there


def test_migrate_creates_then_upgrades_a_sqlite_store(tmp_path: Path) -> None:
    data = tmp_path / "server"
    created = kluis("migrate", "--data", str(data))
    database = data / "kluis.sqlite3"
    assert created.stdout == f"SQLite database {database} at the current schema (created)\n"
    with sqlite3.connect(database) as db:  # an older layout: a column added later is missing
        db.execute("ALTER TABLE accounts DROP COLUMN operator_wipe")
    db.close()
    upgraded = kluis("migrate", "--data", str(data))
    assert "at the current schema (upgraded where it lagged)" in upgraded.stdout
    with sqlite3.connect(database) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(accounts)")}
    db.close()
    assert "operator_wipe" in columns


def test_migrate_from_the_nodes_config_file(tmp_path: Path) -> None:
    with scratch_database() as url:
        config = tmp_path / "kluis.toml"
        config.write_text(f'data = "{tmp_path / "server"}"\ndatabase = "{url}"\n')
        out = kluis("migrate", "--config", str(config))
        assert out.stdout.startswith(f"PostgreSQL schema at version {LATEST} (latest)")
        config.write_text(config.read_text() + "databse = 'typo'\n")
        one_line_error(kluis("migrate", "--config", str(config), check=False), "'databse'")


def test_migrate_refusals_are_one_line() -> None:
    one_line_error(kluis("migrate", check=False), "needs --data DIR or --database URL")
    unreachable = kluis("migrate", "--database", "postgresql://kluis@127.0.0.1:1/x", check=False)
    one_line_error(unreachable, "cannot reach the PostgreSQL database")
    one_line_error(
        kluis("migrate", "--database", "mysql://x/y", check=False), "postgresql://... URL"
    )


@pytest.fixture
def pg_node(tmp_path: Path) -> Iterator[PostgresServerProcess]:
    with scratch_database() as url:
        node = PostgresServerProcess(tmp_path / "server", url)
        kluis("migrate", "--database", url)
        # The operator key before the start: the node publishes it in Welcome.
        data = str(node.data)
        kluis("admin", "init", "--data", data, "--database", url, "--public-url", node.url)
        node.start()
        try:
            yield node
        finally:
            node.stop()


async def test_operator_commands_work_on_postgres_with_database(
    pg_node: PostgresServerProcess, tmp_path: Path
) -> None:
    node, url, data = pg_node, pg_node.database_url, str(pg_node.data)
    key = ["--storage-key-file", str(node.key_file)]  # the nodes' (sealing announcements)
    alice = await register(node, tmp_path / "alice")  # its licence: licence create --database
    account = alice.account_id
    await alice.close()
    announced = await asyncio.to_thread(
        kluis, "admin", "announce", "--data", data, "--database", url, *key, "maintenance at 6"
    )
    assert announced.stderr == "queued for 1 devices\n"
    assert await count_rows(url, "envelopes") >= 1  # in PostgreSQL, not in a SQLite file
    assert not (pg_node.data / "kluis.sqlite3").exists()

    await asyncio.to_thread(
        kluis, "admin", "account", "suspend", "--database", url, account
    )  # no --data needed: the account is in the database
    suspended = KluisClient.open(tmp_path / "alice", PASSPHRASE)
    with pytest.raises(AccountSuspended):
        await suspended.connect()
    await suspended.close()
    await asyncio.to_thread(kluis, "admin", "account", "reinstate", "--database", url, account)
    again = KluisClient.open(tmp_path / "alice", PASSPHRASE)
    await again.connect()
    try:
        texts = [m.text for m in await again.receive(wait=3, until=1)]
        assert texts == ["maintenance at 6"]
    finally:
        await again.close()

    wiped = await asyncio.to_thread(
        kluis, "admin", "wipe", "--data", data, "--database", url, *key, account
    )
    assert wiped.stdout.strip() == again.core.device_id
    assert await count_rows(url, "wipes") == 1

    # The console's users live in the same database (admin.key stays in --data).
    os.environ["KLUIS_ADMIN_PASSWORD"] = "a long enough password"
    try:
        created = await asyncio.to_thread(
            kluis, "admin", "create-user", "--data", data, "--database", url, "ops"
        )
    finally:
        del os.environ["KLUIS_ADMIN_PASSWORD"]
    assert created.stdout.strip().startswith("otpauth://totp/")
    assert await count_rows(url, "admin_users") == 1
    unknown = await asyncio.to_thread(
        kluis, "admin", "account", "suspend", "--database", url, "nobody", check=False
    )
    one_line_error(unknown, "no account")


def test_an_unreachable_database_is_one_line_on_data_commands(tmp_path: Path) -> None:
    url = "postgresql://kluis@127.0.0.1:1/kluis"
    for args in (
        ("licence", "create", "--database", url, "--storage-key-file", str(tmp_path / "k")),
        ("admin", "account", "suspend", "--database", url, "someone"),
    ):
        one_line_error(kluis(*args, check=False), "cannot reach the PostgreSQL database")
    one_line_error(
        kluis("admin", "account", "suspend", "someone", check=False),
        "this command needs --data DIR or --database URL",
    )
