"""The admin console on nodes of one PostgreSQL deployment (``kluis serve --database``): a
console user made with ``kluis admin create-user --database``, a login over HTTP with password
and TOTP, licences listed and created; a second node (the same ``admin.key`` in its own data
folder) serves the session the first started and refuses the TOTP code the first took; and
``kluis admin announce``, ``wipe`` and ``account suspend`` work with ``--database``."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kluis.server.admin import credentials as cred
from tests.admin_testing import ConsoleSession, create_user, operator_init
from tests.integration.test_postgres_server import PostgresServerProcess
from tests.kluis_testing import register
from tests.postgres import scratch_database


def counts_in(page: str) -> list[tuple[str, str, str]]:
    """(created by, days, unredeemed) per row of the admin's licence table."""
    table = page.split('id="licence-counts"', 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr><td>([^<]+)</td><td>(\d+)</td><td>(\d+)</td></tr>", table)


@pytest.fixture
def database() -> Iterator[str]:
    with scratch_database() as url:
        yield url


async def test_console_on_two_postgres_nodes(database: str, tmp_path: Path) -> None:
    node_a = PostgresServerProcess(tmp_path / "a", database)
    node_b = PostgresServerProcess(tmp_path / "b", database)
    browser: ConsoleSession | None = None
    try:
        operator_init(node_a)  # DATA/operator.key, for the announcement and the wipe below
        node_a.start()  # makes DATA/admin.key
        node_a.licences(2, 30)
        boss = create_user(node_a, "boss", database=database)
        assert not (node_a.data / "kluis.sqlite3").exists()  # users went to PostgreSQL

        browser = ConsoleSession(node_a)
        code_used_on_a = boss.code()
        assert (await browser.login(boss, code_used_on_a)).status == 303
        page, status = await browser.get("/admin/licences")
        assert status == 200 and counts_in(page) == [("operator", "30", "2")]
        page, status = await browser.post(
            "/admin/licences", {"count": "3", "days": "7", "format": "show"}
        )
        new_codes = page.split('id="new-codes"', 1)[1].split("</section>", 1)[0]
        assert status == 200 and len(re.findall(r"<li>[^<]+</li>", new_codes)) == 3
        assert counts_in(page) == [("operator", "7", "3"), ("operator", "30", "2")]

        # Node B: its own data folder with a copy of the deployment's admin.key.
        node_b.data.mkdir(parents=True)
        shutil.copy2(node_a.data / cred.KEY_FILE, node_b.data / cred.KEY_FILE)
        node_b.start()
        on_b = ConsoleSession(node_b, browser.http)  # the same cookie jar: A's session
        page, status = await on_b.get("/admin/licences")
        assert status == 200 and ("operator", "7", "3") in counts_in(page)
        other = ConsoleSession(node_b)
        try:
            # Seconds later A's code is still within the ±1-step window; its step is used.
            assert (await other.login(boss, code_used_on_a)).status == 401
            assert (await other.login(boss, boss.code(1))).status == 303
        finally:
            await other.close()

        # The operator's commands with --database (keys from --data); the console on B sees
        # what they did.
        client = await register(node_a, tmp_path / "alice")
        await client.close()

        def admin(*args: str) -> subprocess.CompletedProcess[str]:
            where = ["--data", str(node_a.data), "--database", database]
            where += ["--storage-key-file", str(node_a.key_file)]
            return subprocess.run(
                node_a.cli("admin", *args[:-1], *where, args[-1]),
                check=True,
                capture_output=True,
                text=True,
            )

        assert "queued for 1 devices" in admin("announce", "maintenance tonight").stderr
        assert admin("wipe", client.account_id).stdout.split() == [client.core.device_id]
        admin("account", "suspend", client.account_id)
        page, status = await on_b.get("/admin/accounts")
        assert status == 200
        row = page.split(client.account_id, 1)[1].split("</tr>", 1)[0]
        assert "suspended" in row
    finally:
        if browser is not None:
            await browser.close()
        node_b.stop()
        node_a.stop()
