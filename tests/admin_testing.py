"""Helpers for the admin console tests: console users made with the CLI, logins over HTTP."""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pyotp

from tests.kluis_testing import ServerProcess

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass(frozen=True)
class ConsoleUser:
    name: str
    password: str
    totp_secret: str

    def code(self, step_offset: int = 0) -> str:
        totp = pyotp.TOTP(self.totp_secret)
        return totp.at(time.time() + step_offset * totp.interval)


def create_user(
    server: ServerProcess,
    name: str,
    role: str = "admin",
    quota: int | None = None,
    database: str | None = None,
) -> ConsoleUser:
    """``kluis admin create-user`` (with ``--database`` for a node on PostgreSQL); the password
    comes from KLUIS_ADMIN_PASSWORD."""
    password = f"pw-{name}-{os.urandom(6).hex()}"
    args = ["admin", "create-user", "--data", str(server.data), name, "--role", role]
    if database is not None:
        args += ["--database", database]
    if quota is not None:
        args += ["--quota", str(quota)]
    out = subprocess.run(
        server.cli(*args),
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "KLUIS_ADMIN_PASSWORD": password},
    ).stdout.strip()
    assert out.startswith("otpauth://totp/"), out
    (secret,) = parse_qs(urlsplit(out).query)["secret"]
    return ConsoleUser(name, password, secret)


def csrf_of(html: str) -> str:
    match = _CSRF.search(html)
    assert match, html
    return match.group(1)


class ConsoleSession:
    """One browser-like HTTP session (its own cookie jar) against a server's console."""

    def __init__(self, server: ServerProcess, session: aiohttp.ClientSession | None = None):
        self.base = server.url
        self.http = session or aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf = ""

    async def close(self) -> None:
        await self.http.close()

    async def login(self, user: ConsoleUser, code: str | None = None) -> aiohttp.ClientResponse:
        async with self.http.get(self.base + "/admin/login") as r:
            pre_csrf = csrf_of(await r.text())
        form = {
            "csrf": pre_csrf,
            "name": user.name,
            "password": user.password,
            "code": code or user.code(),
        }
        r = await self.http.post(self.base + "/admin/login", data=form, allow_redirects=False)
        await r.read()
        if r.status == 303:
            page, _ = await self.get("/admin/licences")
            self.csrf = csrf_of(page)
        return r

    async def get(self, path: str) -> tuple[str, int]:
        async with self.http.get(self.base + path, allow_redirects=False) as r:
            return await r.text(), r.status

    async def post(
        self, path: str, form: dict[str, str], csrf: str | None = None
    ) -> tuple[str, int]:
        data = {"csrf": self.csrf if csrf is None else csrf, **form}
        async with self.http.post(self.base + path, data=data, allow_redirects=False) as r:
            return await r.text(), r.status

    def session_token(self) -> str:
        for cookie in self.http.cookie_jar:
            if cookie.key.endswith("kluis_admin"):
                return cookie.value
        raise AssertionError("no session cookie")


def operator_init(server: ServerProcess) -> None:
    """``kluis admin init`` for ``server`` before it starts (the server publishes the key it
    finds at start), bound to the URL clients use."""
    subprocess.run(
        server.cli("admin", "init", "--data", str(server.data), "--public-url", server.url),
        check=True,
        capture_output=True,
    )
