"""The console's rules in process: TOTP replay, session expiry, the append-only audit log, the
global login throttle, quotas and the reseller link (server/admin/), each against the console's
store on SQLite and on PostgreSQL; and what a deployment of several nodes on one PostgreSQL
database shares (a TOTP step, a session)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pyotp
import pytest

from kluis.server.admin import credentials as cred
from kluis.server.admin.console import (
    Console,
    LoginFailed,
    QuotaExceeded,
    Throttled,
    create_user,
)
from kluis.server.admin.postgres import PostgresAdminStore
from kluis.server.admin.store import admin_store_for
from kluis.server.admin.views import CookieSettings
from kluis.server.config import Limits, ServerConfig
from kluis.server.store.postgres import PostgresStore
from kluis.server.store.protocol import Store
from kluis.server.store.sqlite import SqliteStore
from tests.postgres import scratch_database


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Backend:
    """Where a test's console keeps its tables: SQLite in ``tmp_path`` or a scratch PostgreSQL
    database (``url``); ``admin.key`` is in ``tmp_path`` either way."""

    def __init__(self, tmp_path: Path, url: str | None) -> None:
        self.tmp_path, self.url = tmp_path, url

    def open(self) -> Store:
        if self.url is None:
            return SqliteStore(self.tmp_path / "kluis.sqlite3")
        return PostgresStore(self.url, max_connections=4)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend(tmp_path, None)
        return
    with scratch_database() as url:
        yield Backend(tmp_path, url)


@pytest.fixture
def pg_url() -> Iterator[str]:
    with scratch_database() as url:
        yield url


def _open_console(store: Store, tmp_path: Path, clock: Clock, **limits: float) -> Console:
    admin_store = admin_store_for(store)
    assert admin_store is not None
    return Console.open(admin_store, tmp_path, Limits(**limits), clock)  # type: ignore[arg-type]


async def _console(backend: Backend, **limits: float) -> tuple[Console, Store, Clock, str]:
    store = backend.open()
    clock = Clock()
    console = _open_console(store, backend.tmp_path, clock, **limits)
    uri = await create_user(
        console.store,
        cred.SecretBox.open(backend.tmp_path),
        "boss",
        "admin",
        "a long password",
        0,
        int(clock()),
        "cli",
    )
    secret = pyotp.parse_uri(uri).secret
    return console, store, clock, secret


async def test_totp_code_is_single_use_and_sessions_expire(backend: Backend) -> None:
    console, store, clock, secret = await _console(backend, admin_session_ttl_s=600)
    try:
        code = pyotp.TOTP(secret).at(clock())
        user, token = await console.login("c", "boss", "a long password", code)
        assert user.role == "admin"
        with pytest.raises(LoginFailed):  # the same code again: replay
            await console.login("c", "boss", "a long password", code)
        with pytest.raises(LoginFailed):
            await console.login("c", "boss", "wrong password", pyotp.TOTP(secret).at(clock() + 30))
        assert await console.session(token) is not None
        clock.now += 601
        assert await console.session(token) is None
        assert await console.session("x" * 43) is None
    finally:
        await store.close()


async def test_login_is_throttled_globally_and_recovers_with_time(backend: Backend) -> None:
    console, store, clock, _ = await _console(
        backend,
        admin_login_burst=100,
        admin_login_global_burst=4,
        admin_login_global_rate_per_s=0.5,
    )
    try:
        for i in range(4):  # four different addresses: each its own bucket, one global one
            with pytest.raises(LoginFailed):
                await console.login(f"10.0.0.{i}", "boss", "guess", "000000")
        with pytest.raises(Throttled):
            await console.login("10.0.0.99", "boss", "guess", "000000")
        clock.now += 2
        with pytest.raises(LoginFailed):
            await console.login("10.0.0.99", "boss", "guess", "000000")
    finally:
        await store.close()


async def test_audit_log_is_append_only_and_holds_no_secret(backend: Backend) -> None:
    console, store, clock, secret = await _console(backend)
    try:
        user, token = await console.login(
            "c", "boss", "a long password", pyotp.TOTP(secret).at(clock())
        )
        codes = await console.create_licences(user, 2, 30)
        entries = await console.audit_log(user)
        assert [e.action for e in entries] == ["create licences", "log in", "create user"]
        text = repr(entries)
        for secret_text in (*codes, token, secret, "a long password"):
            assert secret_text not in text
    finally:
        await store.close()
    await _refuse_audit_changes(backend)


async def _refuse_audit_changes(backend: Backend) -> None:
    """A direct SQL write, past the console, is refused by the database itself."""
    if backend.url is None:
        db = sqlite3.connect(backend.tmp_path / "kluis.sqlite3")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("UPDATE admin_audit SET detail = 'x'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("DELETE FROM admin_audit")
        db.close()
        return
    conn = await asyncpg.connect(backend.url)
    try:
        for sql in (
            "UPDATE admin_audit SET detail = 'x'",
            "DELETE FROM admin_audit",
            "TRUNCATE admin_audit",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(sql)
        assert await conn.fetchval("SELECT COUNT(*) FROM admin_audit WHERE detail = 'x'") == 0
        assert await conn.fetchval("SELECT COUNT(*) FROM admin_audit") == 3
    finally:
        await conn.close()


async def test_reseller_quota_and_the_only_link_kept(backend: Backend) -> None:
    console, store, clock, _ = await _console(backend)
    try:
        await create_user(
            console.store,
            cred.SecretBox.open(backend.tmp_path),
            "shop",
            "reseller",
            "another long pw",
            3,
            int(clock()),
            "boss",
        )
        shop = await console.store.user("shop")
        assert shop is not None
        await console.create_licences(shop, 2, 30)
        with pytest.raises(QuotaExceeded):
            await console.create_licences(shop, 2, 30)
        counts = await console.licence_counts(shop)
        assert [(c.reseller, c.days, c.count) for c in counts] == [("shop", 30, 2)]
    finally:
        await store.close()


def test_cookie_settings_follow_the_public_url(tmp_path: Path) -> None:
    https = CookieSettings(ServerConfig(tmp_path, public_url="https://chat.example"))
    assert https.secure and https.enabled and https.session == "__Host-kluis_admin"
    loop = CookieSettings(ServerConfig(tmp_path))
    assert not loop.secure and loop.enabled and loop.path == "/admin"
    exposed = CookieSettings(ServerConfig(tmp_path, host="0.0.0.0"))
    assert not exposed.enabled  # plain http off loopback: no console at all


def test_the_totp_secret_is_stored_encrypted(tmp_path: Path) -> None:
    box = cred.SecretBox.open(tmp_path)
    assert (tmp_path / cred.KEY_FILE).stat().st_mode & 0o777 == 0o600
    blob = box.seal("boss", "JBSWY3DPEHPK3PXP")
    assert b"JBSWY3DPEHPK3PXP" not in blob
    assert cred.SecretBox.open(tmp_path).open_secret("boss", blob) == "JBSWY3DPEHPK3PXP"
    assert box.open_secret("other", blob) is None  # bound to the user's name


async def test_nodes_on_one_database_share_totp_steps_sessions_and_quotas(
    pg_url: str, tmp_path: Path
) -> None:
    """Two nodes (two stores, two consoles, one admin.key) on the same PostgreSQL database."""
    store_a, store_b = PostgresStore(pg_url, max_connections=4), PostgresStore(pg_url)
    clock = Clock()
    node_a = _open_console(store_a, tmp_path, clock)
    node_b = _open_console(store_b, tmp_path, clock)
    try:
        # Both nodes start at once on a fresh database: the migrations serialise.
        uri, missing = await asyncio.gather(
            create_user(
                node_a.store,
                cred.SecretBox.open(tmp_path),
                "boss",
                "admin",
                "a long password",
                0,
                int(clock()),
                "cli",
            ),
            node_b.store.user("nobody"),
        )
        assert missing is None
        code = pyotp.TOTP(pyotp.parse_uri(uri).secret).at(clock())

        user, token = await node_a.login("c", "boss", "a long password", code)
        with pytest.raises(LoginFailed):  # the step was used on node A
            await node_b.login("c", "boss", "a long password", code)
        served = await node_b.session(token)  # a session started on A, served by B
        assert served is not None and served.name == "boss"
        await node_b.logout(served, token)
        assert await node_a.session(token) is None

        # A race for one step: exactly one node wins it.
        step = int(clock()) // 30 + 10
        won = await asyncio.gather(
            *(n.store.use_totp_step("boss", step) for n in (node_a, node_b, node_a, node_b))
        )
        assert sorted(won) == [False, False, False, True]

        # A reseller's quota holds across nodes: 2 + 2 codes asked at once, 3 allowed.
        await create_user(
            node_a.store,
            cred.SecretBox.open(tmp_path),
            "shop",
            "reseller",
            "another long pw",
            3,
            int(clock()),
            user.name,
        )
        shop = await node_b.store.user("shop")
        assert shop is not None
        results = await asyncio.gather(
            node_a.create_licences(shop, 2, 30),
            node_b.create_licences(shop, 2, 30),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["QuotaExceeded", "list"]
        assert [(c.reseller, c.count) for c in await node_a.licence_counts(shop)] == [("shop", 2)]
        assert [r.issued for r in await node_b.resellers(user)] == [2]
    finally:
        await store_a.close()
        await store_b.close()


async def test_console_migrations_are_versioned_apart_from_the_store(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    try:
        admin = PostgresAdminStore(store)
        assert await admin.user("boss") is None  # the first call migrates
        other = PostgresStore(pg_url)  # another node: nothing left to do
        assert await PostgresAdminStore(other).user("boss") is None
        await other.close()
        conn = await asyncpg.connect(pg_url)
        try:
            admin_version = await conn.fetchval("SELECT MAX(version) FROM admin_schema_version")
            rows = await conn.fetchval("SELECT COUNT(*) FROM admin_schema_version")
            store_version = await conn.fetchval("SELECT MAX(version) FROM schema_version")
        finally:
            await conn.close()
        assert (admin_version, rows) == (1, 1)
        assert store_version >= 2  # the store's own list, untouched by the console's
    finally:
        await store.close()


async def test_a_node_with_another_admin_key_refuses_logins_and_says_why(
    pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()  # a new folder: a new admin.key, not a copy of A's
    store_a, store_b = PostgresStore(pg_url), PostgresStore(pg_url)
    clock = Clock()
    node_a = _open_console(store_a, tmp_path / "a", clock)
    node_b = _open_console(store_b, tmp_path / "b", clock)
    try:
        uri = await create_user(
            node_a.store,
            cred.SecretBox.open(tmp_path / "a"),
            "boss",
            "admin",
            "a long password",
            0,
            int(clock()),
            "cli",
        )
        code = pyotp.TOTP(pyotp.parse_uri(uri).secret).at(clock())
        with caplog.at_level("WARNING", logger="kluis.server.admin"), pytest.raises(LoginFailed):
            await node_b.login("c", "boss", "a long password", code)
        assert "admin.key" in caplog.text
        assert code not in caplog.text and "a long password" not in caplog.text
        await node_a.login("c", "boss", "a long password", code)  # the step was not used on B
    finally:
        await store_a.close()
        await store_b.close()
