"""The console's access rules on a real server: the authorisation matrix (anonymous, a logged-in
messaging device, reseller A, reseller B, admin against every route and action), CSRF, cookie
flags and the login throttle."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from kluis.client.client import KluisClient
from kluis.client.transport import WebSocketTransport
from kluis.protocol import frames as f
from kluis.server.admin.views import ROUTES
from tests.admin_testing import ConsoleSession, ConsoleUser, create_user, operator_init
from tests.kluis_testing import PASSPHRASE, RawConnection, ServerProcess, fast_kdf

ADMIN_ONLY = ("/admin/resellers", "/admin/announcements")
ACCOUNT_ACTION = ("POST", "/admin/accounts")  # suspend, reinstate, wipe: admins only


def codes_in(page: str) -> list[str]:
    section = page.split('id="new-codes"', 1)[1].split("</section>", 1)[0]
    return re.findall(r"<li>([^<]+)</li>", section)


async def redeem(server: ServerProcess, code: str, profile: Path) -> KluisClient:
    return await KluisClient.register(
        server.url,
        code,
        profile,
        PASSPHRASE,
        transport_factory=WebSocketTransport,
        kdf=fast_kdf(),
    )


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[dict[str, object]]:
    server = ServerProcess(tmp_path / "data")
    operator_init(server)  # the operator key, in DATA/operator.key
    server.start()
    try:
        server.licences(0 + 1)  # the database exists; one operator code (from the CLI)
        users = {
            "admin": create_user(server, "boss"),
            "a": create_user(server, "shop-a", "reseller", quota=5),
            "b": create_user(server, "shop-b", "reseller", quota=5),
        }
        yield {"server": server, "users": users, "tmp": tmp_path}
    finally:
        server.stop()


async def test_authorisation_matrix(world: dict[str, object], tmp_path: Path) -> None:
    server = world["server"]
    users = world["users"]
    assert isinstance(server, ServerProcess) and isinstance(users, dict)
    sessions: dict[str, ConsoleSession] = {}
    clients: list[KluisClient] = []
    raw: RawConnection | None = None
    try:
        for role in ("admin", "a", "b"):
            user = users[role]
            assert isinstance(user, ConsoleUser)
            sessions[role] = ConsoleSession(server)
            assert (await sessions[role].login(user)).status == 303
        # One account from each reseller's code, one from an admin's code.
        accounts: dict[str, str] = {}
        for role in ("a", "b", "admin"):
            page, status = await sessions[role].post(
                "/admin/licences", {"count": "1", "days": "30"}
            )
            assert status == 200
            (code,) = codes_in(page)
            client = await redeem(server, code, tmp_path / f"profile-{role}")
            clients.append(client)
            accounts[role] = client.account_id
        # A messaging device, logged in on its WebSocket: its session gets nothing more.
        raw = await RawConnection.open(server)
        await raw.send(
            f.encode(f.Auth(rid=1, device=clients[0].core.device_id, sig=raw.login_sig(clients[0])))
        )
        assert isinstance(await raw.recv(), f.Welcome)
        sessions["device"] = ConsoleSession(server, raw.session)
        sessions["anonymous"] = ConsoleSession(server)

        forms = {
            "/admin/licences": {"count": "1", "days": "30"},
            "/admin/resellers": {"name": "", "quota": "1"},
            "/admin/accounts": {"account": accounts["a"], "action": "suspend"},
            "/admin/announcements": {"text": ""},
            "/admin/logout": {},
        }
        reseller_routes = {r for r in ROUTES if r[1] not in ADMIN_ONLY and r != ACCOUNT_ACTION}
        allowed = {"admin": set(ROUTES), "a": reseller_routes, "b": reseller_routes}
        assert ACCOUNT_ACTION in ROUTES and ("POST", "/admin/announcements") in ROUTES
        seen: dict[tuple[str, str, str], str] = {}
        for who, session in sessions.items():
            for method, path in ROUTES:
                if path == "/admin/logout":
                    continue  # last, below
                if method == "GET":
                    page, status = await session.get(path)
                else:
                    form = dict(forms[path])
                    if path == "/admin/resellers":
                        form["name"] = f"new-by-{who}"
                    if path == "/admin/announcements":
                        form["text"] = f"notice sent by {who}"
                    page, status = await session.post(path, form)
                seen[(who, method, path)] = page
                if who in ("anonymous", "device"):
                    # Nothing: a page sends to the login form, an action is refused.
                    expected = 303 if method == "GET" else 403
                    assert status == expected, (who, method, path, status)
                    assert "Location" not in page
                elif (method, path) in allowed[who]:
                    assert status == (303 if path == "/admin/" else 200), (who, path, status, page)
                else:
                    assert status == 403 and 'data-code="forbidden"' in page, (who, path)

        # Accounts: each reseller sees exactly its own; the admin sees all three.
        for who, mine in (("a", "a"), ("b", "b")):
            page = seen[(who, "GET", "/admin/accounts")]
            assert accounts[mine] in page
            assert all(accounts[other] not in page for other in accounts if other != mine)
            audit = seen[(who, "GET", "/admin/audit")]
            other = "shop-b" if who == "a" else "shop-a"
            assert other not in audit and "boss" not in audit
            licences = seen[(who, "GET", "/admin/licences")]
            assert "operator" not in licences and other not in licences
        page = seen[("admin", "GET", "/admin/accounts")]
        assert all(account in page for account in accounts.values())
        assert "shop-a" in page and "shop-b" in page  # the reseller link, shown to the admin
        # Only the admin's reseller was created; the refused actions changed nothing.
        resellers, _ = await sessions["admin"].get("/admin/resellers")
        assert "new-by-admin" in resellers
        for who in ("a", "b", "anonymous", "device"):
            assert f"<td>new-by-{who}</td>" not in resellers
        audit, _ = await sessions["admin"].get("/admin/audit")
        assert audit.count("create licences") == 6  # three above, three in the loop
        assert "(unknown)" not in audit
        # The operator's actions: only the admin's suspension and announcement happened.
        page = seen[("admin", "POST", "/admin/accounts")]
        assert f"Account {accounts['a']} suspended." in page
        assert "1 device(s)" not in page
        page = seen[("admin", "POST", "/admin/announcements")]
        assert "queued for 3 device(s)" in page and "notice sent by admin" in page
        (notice,) = await clients[1].receive(wait=2, until=1)
        assert (notice.sender, notice.text) == ("operator", "notice sent by admin")
        for who in ("a", "b", "device", "anonymous"):
            for action in ("reinstate", "wipe", "suspend"):
                for account in accounts.values():
                    form = {"account": account, "action": action}
                    page, status = await sessions[who].post("/admin/accounts", form)
                    assert status == 403, (who, action, status)
            assert "Location" not in page
        page, _ = await sessions["admin"].get("/admin/accounts")
        row = page.split(accounts["a"], 1)[1].split("</tr>", 1)[0]
        assert "<td>suspended</td>" in row
        assert page.count("<td>suspended</td>") == 1 and page.count("<td>1</td>") >= 3
        audit, _ = await sessions["admin"].get("/admin/audit")
        assert audit.count("suspend account") == 1 and "order wipe" not in audit
        assert audit.count("<td>announce</td>") == 1 and "notice sent by a" not in audit.replace(
            "notice sent by admin", ""
        )
        page, status = await sessions["admin"].post(
            "/admin/accounts", {"account": accounts["a"], "action": "reinstate"}
        )
        assert status == 200 and f"Account {accounts['a']} reinstated." in page
        assert "<td>suspended</td>" not in page
        # Reseller A's quota: 5 codes, 2 issued.
        _, status = await sessions["a"].post("/admin/licences", {"count": "4", "days": "30"})
        assert status == 403
        # Logout ends the session; the cookie no longer opens anything.
        for who in ("admin", "a", "b"):
            token = sessions[who].session_token()
            _, status = await sessions[who].post("/admin/logout", {})
            assert status == 303
            replay = ConsoleSession(server)
            replay.http.cookie_jar.update_cookies({"kluis_admin": token})
            _, status = await replay.get("/admin/accounts")
            assert status == 303
            await replay.close()
    finally:
        if raw is not None:
            await raw.close()
        for client in clients:
            await client.close()
        for name, session in sessions.items():
            if name != "device":
                await session.close()


async def test_csrf_is_required_and_cookies_are_strict(world: dict[str, object]) -> None:
    server, users = world["server"], world["users"]
    assert isinstance(server, ServerProcess) and isinstance(users, dict)
    admin, other = ConsoleSession(server), ConsoleSession(server)
    try:
        response = await admin.login(users["admin"])
        cookie = response.headers["Set-Cookie"]
        assert "SameSite=Strict" in cookie and "HttpOnly" in cookie and "Path=/admin" in cookie
        assert response.headers["Content-Security-Policy"].startswith(
            "default-src 'self'; frame-ancestors 'none'"
        )
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        await other.login(users["a"])
        before, _ = await admin.get("/admin/audit")
        for token in ("", "x" * 43, other.csrf):  # none, made up, another session's
            page, status = await admin.post("/admin/licences", {"count": "1", "days": "9"}, token)
            assert status == 403 and 'data-code="csrf_failed"' in page
            page, status = await admin.post("/admin/resellers", {"name": "z", "quota": "1"}, token)
            assert status == 403 and 'data-code="csrf_failed"' in page
            for path, form in (
                ("/admin/announcements", {"text": "no token"}),
                ("/admin/accounts", {"account": "x", "action": "suspend"}),
                ("/admin/accounts", {"account": "x", "action": "wipe"}),
            ):
                page, status = await admin.post(path, form, token)
                assert status == 403 and 'data-code="csrf_failed"' in page, (path, form)
        after, _ = await admin.get("/admin/audit")
        assert after.count("create") == before.count("create")
        table = after.split('id="audit"', 1)[1]
        for action in ("<td>announce</td>", "suspend account", "order wipe"):
            assert action not in table
        sent, _ = await admin.get("/admin/announcements")
        assert "None sent yet." in sent
        # The login form needs its pre-session cookie's token too.
        fresh = ConsoleSession(server)
        async with fresh.http.post(
            server.url + "/admin/login",
            data={"csrf": "x", "name": "boss", "password": "p", "code": "1"},
        ) as r:
            assert r.status == 403 and 'data-code="csrf_failed"' in await r.text()
        await fresh.close()
    finally:
        await admin.close()
        await other.close()


async def test_https_public_url_makes_secure_host_cookies(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", "--public-url", "https://chat.example")
    server.start()
    try:
        async with aiohttp.ClientSession() as http, http.get(server.url + "/admin/login") as r:
            cookie = r.headers["Set-Cookie"]
        assert cookie.startswith("__Host-kluis_admin_login=")
        assert "Secure" in cookie and "Path=/;" in cookie and "SameSite=Strict" in cookie
    finally:
        server.stop()


async def test_login_brute_force_is_throttled(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", "--limit", "admin_login_burst=3")
    server.start()
    try:
        server.licences(1)
        boss = create_user(server, "boss")
        wrong = ConsoleUser("boss", "not the password", boss.totp_secret)
        session = ConsoleSession(server)
        statuses = [(await session.login(wrong)).status for _ in range(5)]
        assert statuses == [401, 401, 401, 429, 429]
        response = await session.login(boss)  # even the right password waits now
        assert response.status == 429
        page = await response.text()
        assert 'data-code="rate_limited"' in page
        await session.close()
    finally:
        server.stop()
