"""The console's HTTP side: routes under ``/admin``, cookies, CSRF, headers and pages.

Theory of operation: each handler parses the form, asks :class:`Console` and renders a Jinja2
template (autoescaped; no script at all, so the CSP allows none). ``guard`` resolves the session
cookie to a user before any handler runs, refuses roles a route does not allow, and checks the
CSRF token of every POST in constant time. Every ``/admin`` response, errors and 404s included,
carries the security headers (``add_console`` hooks them on the main application).

Cookies are HttpOnly and SameSite=Strict. They are Secure, under the ``__Host-`` prefix, when
the server's public URL is https (behind a TLS proxy). On plain http the console is served only
when the server listens on loopback (an operator's SSH tunnel or local browser): cookies then
cannot be Secure, as a browser would drop them; on any other http address every ``/admin`` page
answers 403 and asks for ``--public-url https://...``.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from urllib.parse import urlsplit

import jinja2
from aiohttp import web

from kluis.protocol.operator import MAX_ANNOUNCEMENT_TEXT
from kluis.server.admin import credentials as cred
from kluis.server.admin.console import (
    BadRequest,
    Console,
    ConsoleError,
    CsrfFailed,
    Forbidden,
    OperatorServices,
)
from kluis.server.admin.store import AdminStore, AdminUser
from kluis.server.config import ServerConfig

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
_env = jinja2.Environment(
    loader=jinja2.PackageLoader("kluis.server.admin", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
_env.filters["date"] = lambda t: datetime.fromtimestamp(int(t), UTC).strftime("%Y-%m-%d")
_env.filters["day"] = lambda d: "-" if d is None else _env.filters["date"](int(d) * 86_400)
_CSS = resources.files("kluis.server.admin").joinpath("static/admin.css").read_bytes()

Handler = Callable[[web.Request, AdminUser], Awaitable[web.StreamResponse]]


class CookieSettings:
    """Cookie names and flags for this server's public URL (module docstring)."""

    def __init__(self, config: ServerConfig) -> None:
        public = urlsplit(config.public_url or f"http://{config.host}:{config.port}")
        self.secure = public.scheme == "https"
        self.enabled = self.secure or _loopback(config.host)
        prefix = "__Host-" if self.secure else ""
        self.session = prefix + "kluis_admin"
        self.login = prefix + "kluis_admin_login"
        self.path = "/" if self.secure else "/admin"  # __Host- requires Path=/

    def set(self, response: web.StreamResponse, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path=self.path,
            secure=self.secure,
            httponly=True,
            samesite="Strict",
        )

    def clear(self, response: web.StreamResponse, name: str) -> None:
        response.del_cookie(name, path=self.path, secure=self.secure, samesite="Strict")


CONSOLE = web.AppKey("admin_console", Console)
SETTINGS = web.AppKey("admin_cookies", CookieSettings)


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def render(template: str, status: int = 200, **context: object) -> web.Response:
    return render_page(template, context, status)


def render_page(template: str, context: dict[str, object], status: int = 200) -> web.Response:
    return web.Response(
        text=_env.get_template(template).render(**context),
        status=status,
        content_type="text/html",
        charset="utf-8",
    )


def _user_and_token(request: web.Request) -> tuple[str, Awaitable[AdminUser | None]]:
    token = request.cookies.get(request.app[SETTINGS].session, "")
    return token, request.app[CONSOLE].session(token)


def guard(
    *roles: str,
) -> Callable[[Handler], Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """Only a live session of one of ``roles``; a POST also needs the session's CSRF token."""

    def wrap(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def run(request: web.Request) -> web.StreamResponse:
            token, pending = _user_and_token(request)
            user = await pending
            if user is None:
                if request.method == "GET":
                    return _redirect("/admin/login")
                raise Forbidden("log in first")
            if user.role not in roles:
                raise Forbidden("your role does not allow this")
            if request.method == "POST":
                form = await request.post()
                if not cred.csrf_ok(token, str(form.get("csrf", ""))):
                    raise CsrfFailed("the form's CSRF token is missing or wrong; reload the page")
            request["admin_token"] = token
            return await handler(request, user)

        return run

    return wrap


def _page(template: str, request: web.Request, user: AdminUser, **context: object) -> web.Response:
    context.update(user=user, csrf=cred.csrf_for(request["admin_token"]))
    return render_page(template, context)


# ---- login ----------------------------------------------------------------------------------------


async def login_form(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    pre = request.cookies.get(settings.login, "")
    if len(pre) != 43:
        pre = cred.new_token()
    response = render("login.html", csrf=cred.csrf_for(pre), error=None)
    settings.set(response, settings.login, pre, 3600)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    settings, console = request.app[SETTINGS], request.app[CONSOLE]
    form = await request.post()
    pre = request.cookies.get(settings.login, "")
    if not pre or not cred.csrf_ok(pre, str(form.get("csrf", ""))):
        raise CsrfFailed("the login form expired; reload the page")
    _, token = await console.login(
        request.remote or "unknown",
        str(form.get("name", "")),
        str(form.get("password", "")),
        str(form.get("code", "")),
    )
    response = _redirect("/admin/licences")
    settings.set(response, settings.session, token, console.session_ttl_s)
    settings.clear(response, settings.login)
    return response


@guard("admin", "reseller")
async def logout(request: web.Request, user: AdminUser) -> web.StreamResponse:
    await request.app[CONSOLE].logout(user, request["admin_token"])
    response = _redirect("/admin/login")
    request.app[SETTINGS].clear(response, request.app[SETTINGS].session)
    return response


# ---- pages ----------------------------------------------------------------------------------------


@guard("admin", "reseller")
async def index(request: web.Request, user: AdminUser) -> web.StreamResponse:
    return _redirect("/admin/licences")


@guard("admin", "reseller")
async def licences(request: web.Request, user: AdminUser) -> web.StreamResponse:
    counts = await request.app[CONSOLE].licence_counts(user)
    fresh = await request.app[CONSOLE].store.user(user.name)
    return _page("licences.html", request, fresh or user, counts=counts, codes=None, days=None)


def _int(form: object, name: str) -> int:
    assert hasattr(form, "get")
    try:
        return int(str(form.get(name, "")))
    except ValueError:
        raise BadRequest(f"{name} must be a whole number") from None


@guard("admin", "reseller")
async def create_licences(request: web.Request, user: AdminUser) -> web.StreamResponse:
    form = await request.post()
    count, days = _int(form, "count"), _int(form, "days")
    console = request.app[CONSOLE]
    codes = await console.create_licences(user, count, days)
    if form.get("format") == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(["code", "days"])
        writer.writerows([code, days] for code in codes)
        return web.Response(
            text=out.getvalue(),
            content_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="kluis-licences.csv"'},
        )
    counts = await console.licence_counts(user)
    fresh = await console.store.user(user.name)
    return _page("licences.html", request, fresh or user, counts=counts, codes=codes, days=days)


@guard("admin", "reseller")
async def accounts(request: web.Request, user: AdminUser) -> web.StreamResponse:
    rows = await request.app[CONSOLE].accounts(user)
    return _page("accounts.html", request, user, accounts=rows, done=None)


@guard("admin")
async def account_action(request: web.Request, user: AdminUser) -> web.StreamResponse:
    """Suspend, reinstate or wipe one account (the forms on the accounts page)."""
    form = await request.post()
    console = request.app[CONSOLE]
    account, action = str(form.get("account", "")), str(form.get("action", ""))
    if action in ("suspend", "reinstate"):
        await console.set_suspended(user, account, action == "suspend")
        done = f"Account {account} {'suspended' if action == 'suspend' else 'reinstated'}."
    elif action == "wipe":
        devices = await console.wipe(user, account)
        done = f"Wipe ordered for {len(devices)} device(s) of account {account}."
    else:
        raise BadRequest("action must be suspend, reinstate or wipe")
    rows = await console.accounts(user)
    return _page("accounts.html", request, user, accounts=rows, done=done)


async def _announcements_page(
    request: web.Request, user: AdminUser, sent: int | None
) -> web.Response:
    console = request.app[CONSOLE]
    history = await console.announcements(user)
    return _page(
        "announcements.html",
        request,
        user,
        key_problem=console.key_problem(),
        history=history,
        sent=sent,
        max_chars=MAX_ANNOUNCEMENT_TEXT,
    )


@guard("admin")
async def announcements(request: web.Request, user: AdminUser) -> web.StreamResponse:
    return await _announcements_page(request, user, None)


@guard("admin")
async def announce(request: web.Request, user: AdminUser) -> web.StreamResponse:
    form = await request.post()
    sent = await request.app[CONSOLE].announce(user, str(form.get("text", "")))
    return await _announcements_page(request, user, sent)


@guard("admin")
async def resellers(request: web.Request, user: AdminUser) -> web.StreamResponse:
    rows = await request.app[CONSOLE].resellers(user)
    return _page("resellers.html", request, user, resellers=rows, created=None)


@guard("admin")
async def create_reseller(request: web.Request, user: AdminUser) -> web.StreamResponse:
    form = await request.post()
    console = request.app[CONSOLE]
    created = await console.create_reseller(user, str(form.get("name", "")), _int(form, "quota"))
    rows = await console.resellers(user)
    return _page("resellers.html", request, user, resellers=rows, created=created)


@guard("admin", "reseller")
async def audit(request: web.Request, user: AdminUser) -> web.StreamResponse:
    entries = await request.app[CONSOLE].audit_log(user)
    return _page("audit.html", request, user, entries=entries)


async def stylesheet(request: web.Request) -> web.StreamResponse:
    return web.Response(body=_CSS, content_type="text/css")


# ---- wiring ---------------------------------------------------------------------------------------


@web.middleware
async def errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if not request.app[SETTINGS].enabled:
        return render(
            "error.html",
            403,
            code="https_required",
            message="the console needs https: run the server with --public-url https://...",
        )
    try:
        return await handler(request)
    except ConsoleError as exc:
        return render("error.html", exc.status, code=exc.code, message=str(exc))


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path == "/admin" or request.path.startswith("/admin/"):
        response.headers.update(SECURITY_HEADERS)


def add_console(
    app: web.Application,
    config: ServerConfig,
    store: AdminStore,
    operator: OperatorServices | None = None,
) -> None:
    """Serve the console under ``/admin`` of ``app`` (``server/app.py``) on ``store``
    (``admin_store_for`` the node's store); ``operator``: the server's services its
    announcement and account actions go through."""
    admin = web.Application(middlewares=[errors])
    admin[SETTINGS] = CookieSettings(config)
    admin[CONSOLE] = Console.open(store, config.data_dir, config.limits, time.time, operator)
    admin.router.add_get("", index)
    admin.router.add_get("/", index)
    admin.router.add_get("/login", login_form)
    admin.router.add_post("/login", login)
    admin.router.add_post("/logout", logout)
    admin.router.add_get("/licences", licences)
    admin.router.add_post("/licences", create_licences)
    admin.router.add_get("/accounts", accounts)
    admin.router.add_post("/accounts", account_action)
    admin.router.add_get("/announcements", announcements)
    admin.router.add_post("/announcements", announce)
    admin.router.add_get("/resellers", resellers)
    admin.router.add_post("/resellers", create_reseller)
    admin.router.add_get("/audit", audit)
    admin.router.add_get("/static/admin.css", stylesheet)
    app.add_subapp("/admin", admin)
    app.on_response_prepare.append(_headers)


# Every route and action, for the authorisation matrix test: (method, path, form fields).
ROUTES: tuple[tuple[str, str], ...] = (
    ("GET", "/admin/"),
    ("GET", "/admin/licences"),
    ("POST", "/admin/licences"),
    ("GET", "/admin/accounts"),
    ("POST", "/admin/accounts"),
    ("GET", "/admin/announcements"),
    ("POST", "/admin/announcements"),
    ("GET", "/admin/resellers"),
    ("POST", "/admin/resellers"),
    ("GET", "/admin/audit"),
    ("POST", "/admin/logout"),
)
