"""The console's rules in process: TOTP replay, session expiry, the append-only audit log, the
global login throttle, quotas and the reseller link (server/admin/)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

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
from kluis.server.admin.store import AdminStore
from kluis.server.admin.views import CookieSettings
from kluis.server.config import Limits, ServerConfig
from kluis.server.store.sqlite import SqliteStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def _console(tmp_path: Path, **limits: float) -> tuple[Console, SqliteStore, Clock, str]:
    store = SqliteStore(tmp_path / "kluis.sqlite3")
    clock = Clock()
    console = Console.open(AdminStore(store), tmp_path, Limits(**limits), clock)  # type: ignore[arg-type]
    uri = await create_user(
        console.store,
        cred.SecretBox.open(tmp_path),
        "boss",
        "admin",
        "a long password",
        0,
        int(clock()),
        "cli",
    )
    secret = pyotp.parse_uri(uri).secret
    return console, store, clock, secret


async def test_totp_code_is_single_use_and_sessions_expire(tmp_path: Path) -> None:
    console, store, clock, secret = await _console(tmp_path, admin_session_ttl_s=600)
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


async def test_login_is_throttled_globally_and_recovers_with_time(tmp_path: Path) -> None:
    console, store, clock, _ = await _console(
        tmp_path,
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


async def test_audit_log_is_append_only_and_holds_no_secret(tmp_path: Path) -> None:
    console, store, clock, secret = await _console(tmp_path)
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
    db = sqlite3.connect(tmp_path / "kluis.sqlite3")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE admin_audit SET detail = 'x'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM admin_audit")
    db.close()


async def test_reseller_quota_and_the_only_link_kept(tmp_path: Path) -> None:
    console, store, clock, _ = await _console(tmp_path)
    try:
        await create_user(
            console.store,
            cred.SecretBox.open(tmp_path),
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
