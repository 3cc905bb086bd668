"""The console's rules: who may log in, what each role may see and do, and the audit of it.

Theory of operation: handlers (``views.py``) parse and render; this module decides. Roles:
- ``admin``: every licence, account and reseller; creates licences without quota and resellers;
  reads the whole audit log;
- ``admin`` also sends announcements signed by the operator key, suspends and reinstates
  accounts and orders wipes where an account's policy allows it (``OperatorServices``: the live
  server's own services, so an online device is reached at once). The key is read from
  ``DATA/operator.key`` for each action and dropped after it; when the operator keeps it offline
  the console says so and signs nothing: it never makes, asks for or receives a key;
- ``reseller``: creates licences within its quota; sees only the unredeemed codes it created,
  the accounts redeemed from them (ID, expiry, device count, last-seen day: never contents or
  contacts, which the server does not have) and its own audit entries.
Login takes a password (argon2id) and a TOTP code (one use per time step), and is throttled per
client address and for the whole node before any check runs. Every action, failed logins
included, goes into the append-only audit log with no secret in it. Time is injected.

Several nodes on one PostgreSQL database (``admin/postgres.py``) share users, sessions, used
TOTP steps and the audit log, so any node serves a session another started and a code works
once in the deployment. The login throttles are in each node's memory: N nodes behind a load
balancer let through N times the attempts (the argon2id hash and the TOTP code still stand).
Every node needs the same ``DATA/admin.key``: a node with another key cannot open the TOTP
secrets, refuses every login and says so in its log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kluis.crypto.account_key import AccountKey
from kluis.errors import LocalProtocolError
from kluis.server.accounts import licence_hash, new_licence_code
from kluis.server.admin import credentials as cred
from kluis.server.admin.store import (
    AccountRow,
    AdminStore,
    AdminUser,
    AuditEntry,
    LicenceCount,
    ResellerRow,
    Role,
)
from kluis.server.config import Limits
from kluis.server.delivery.protocol import DeliveryBus
from kluis.server.mailbox import Mailbox
from kluis.server.operator import announcements, keyfile
from kluis.server.operator.subscriptions import Subscriptions
from kluis.server.operator.wipe import Wipes, operator_orders
from kluis.server.ratelimit import BucketMap, TokenBucket
from kluis.server.store.protocol import Store

log = logging.getLogger("kluis.server.admin")

MAX_CODES = 10_000
MAX_DAYS = 36_500
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


class ConsoleError(Exception):
    """A refusal shown as a typed error page: a stable ``code`` and an HTTP status."""

    code = "console_error"
    status = 400


class BadRequest(ConsoleError):
    code, status = "bad_request", 400


class LoginFailed(ConsoleError):
    code, status = "login_failed", 401


class Forbidden(ConsoleError):
    code, status = "forbidden", 403


class CsrfFailed(ConsoleError):
    code, status = "csrf_failed", 403


class QuotaExceeded(ConsoleError):
    code, status = "quota_exceeded", 403


class Throttled(ConsoleError):
    code, status = "rate_limited", 429


class KeyMissing(ConsoleError):
    code, status = "operator_key_missing", 409


class WipeRefused(ConsoleError):
    code, status = "wipe_refused", 403


ANNOUNCE = "announce"  # the audit action of a sent announcement; its detail: the first 80 chars


def check_name(name: str) -> str:
    name = name.strip().lower()
    if not 1 <= len(name) <= 32 or not set(name) <= NAME_CHARS:
        raise BadRequest("a name is 1 to 32 of a-z, 0-9, '-', '_' and '.'")
    return name


async def create_user(
    store: AdminStore,
    box: cred.SecretBox,
    name: str,
    role: Role,
    password: str,
    quota: int,
    now: int,
    actor: str,
) -> str:
    """A new console user; returns the TOTP provisioning URI (shown once, never logged)."""
    name = check_name(name)
    if len(password) < 12:
        raise BadRequest("a console password has at least 12 characters")
    if role == "reseller" and not 0 <= quota <= 10_000_000:
        raise BadRequest("a quota is 0 to 10000000 codes")
    secret = cred.new_totp_secret()
    ok = await store.create_user(
        name,
        role,
        cred.hash_password(password),
        box.seal(name, secret),
        quota if role == "reseller" else 0,
        now,
        actor,
    )
    if not ok:
        raise BadRequest(f"a console user named {name!r} exists already")
    return cred.provisioning_uri(name, secret)


@dataclass(frozen=True, slots=True)
class OperatorServices:
    """The live server's services the operator's pages act through (``server/app.py``)."""

    data_dir: Path  # where operator.json and, unless moved offline, operator.key live
    store: Store
    mailbox: Mailbox
    bus: DeliveryBus
    subscriptions: Subscriptions
    wipes: Wipes


@dataclass(frozen=True, slots=True)
class CreatedReseller:
    name: str
    password: str
    provisioning_uri: str


class Console:
    """The admin console's service: login, sessions, and each role's pages and actions."""

    def __init__(
        self,
        store: AdminStore,
        box: cred.SecretBox,
        limits: Limits,
        clock: Callable[[], float],
        operator: OperatorServices | None = None,
    ) -> None:
        self.store, self._box, self._limits, self._clock = store, box, limits, clock
        self._operator = operator
        self._per_client = BucketMap(limits.admin_login_rate_per_s, limits.admin_login_burst, clock)
        self._global = TokenBucket(
            limits.admin_login_global_rate_per_s, limits.admin_login_global_burst, clock
        )

    @classmethod
    def open(
        cls,
        store: AdminStore,
        data_dir: Path,
        limits: Limits,
        clock: Callable[[], float],
        operator: OperatorServices | None = None,
    ) -> Console:
        return cls(store, cred.SecretBox.open(data_dir), limits, clock, operator)

    @property
    def session_ttl_s(self) -> int:
        return self._limits.admin_session_ttl_s

    def _now(self) -> int:
        return int(self._clock())

    # ---- login and sessions -------------------------------------------------------------------

    async def login(
        self, client: str, name: str, password: str, code: str
    ) -> tuple[AdminUser, str]:
        """Check a login; returns the user and a new session token (kept only hashed)."""
        if not self._per_client.get(client).take() or not self._global.take():
            raise Throttled("too many login attempts; wait a minute and try again")
        name = name.strip().lower()[:64]
        user = await self.store.user(name) if name else None
        ok = cred.check_password(user.password_hash if user else None, password)
        if user is None or not ok:
            await self._failed(user)
            raise LoginFailed("wrong name, password or code")
        secret = self._box.open_secret(user.name, user.totp)
        if secret is None:
            log.warning(
                "a console user's TOTP secret does not open with this node's admin.key: every "
                "node needs a copy of the admin.key of the data folder create-user was given"
            )
        step = None if secret is None else cred.totp_step(secret, code, self._clock())
        if step is None or not await self.store.use_totp_step(user.name, step):
            await self._failed(user)
            raise LoginFailed("wrong name, password or code")
        token = cred.new_token()
        now = self._now()
        await self.store.start_session(
            cred.token_hash(token), user.name, now + self._limits.admin_session_ttl_s, now
        )
        return user, token

    async def _failed(self, user: AdminUser | None) -> None:
        # Only a known name is recorded: a mistyped one may be someone's password.
        actor = user.name if user else "(unknown)"
        await self.store.audit(actor, "login failed", "", self._now())

    async def session(self, token: str) -> AdminUser | None:
        if not token or len(token) > 64:
            return None
        return await self.store.session_user(cred.token_hash(token), self._now())

    async def logout(self, user: AdminUser, token: str) -> None:
        await self.store.end_session(cred.token_hash(token), user.name, self._now())

    # ---- licences -----------------------------------------------------------------------------

    async def create_licences(self, user: AdminUser, count: int, days: int) -> list[str]:
        """New codes (returned once, stored only hashed); a reseller's count within quota."""
        if not 1 <= count <= MAX_CODES or not 1 <= days <= MAX_DAYS:
            raise BadRequest(f"count must be 1..{MAX_CODES} and days 1..{MAX_DAYS}")
        codes = [new_licence_code() for _ in range(count)]
        reseller = user.name if user.role == "reseller" else None
        ok = await self.store.issue_licences(
            [licence_hash(c) for c in codes], days, self._now(), user.name, reseller
        )
        if not ok:
            raise QuotaExceeded(
                f"quota: {user.quota - user.issued} of {user.quota} codes left, {count} asked"
            )
        return codes

    async def licence_counts(self, user: AdminUser) -> list[LicenceCount]:
        return await self.store.licence_counts(user.name, everyone=user.role == "admin")

    # ---- accounts, resellers, audit -----------------------------------------------------------

    async def accounts(self, user: AdminUser) -> list[AccountRow]:
        return await self.store.accounts(user.name, everyone=user.role == "admin")

    async def resellers(self, user: AdminUser) -> list[ResellerRow]:
        self._admin_only(user)
        return await self.store.resellers()

    async def create_reseller(self, user: AdminUser, name: str, quota: int) -> CreatedReseller:
        """A reseller with a random password and TOTP secret, shown once to the admin, who
        hands them over."""
        self._admin_only(user)
        password = cred.new_token()[:24]
        uri = await create_user(
            self.store, self._box, name, "reseller", password, quota, self._now(), user.name
        )
        return CreatedReseller(check_name(name), password, uri)

    async def audit_log(self, user: AdminUser) -> list[AuditEntry]:
        return await self.store.audit_log(None if user.role == "admin" else user.name)

    # ---- the operator's actions (admin only) ---------------------------------------------------

    def _services(self) -> OperatorServices:
        if self._operator is None:
            raise BadRequest("this console runs without the server's operator services")
        return self._operator

    def key_problem(self) -> str | None:
        """Why nothing can be signed here now (the key is offline or was never made), or None."""
        try:
            self._signing_key()
        except KeyMissing as exc:
            return str(exc)
        return None

    def _signing_key(self) -> tuple[AccountKey, keyfile.OperatorInfo]:
        data = self._services().data_dir
        if keyfile.public_info(data) is None:
            raise KeyMissing(
                "this server has no operator key: make one on the server with kluis admin init"
            )
        if not (data / keyfile.KEY_FILE).exists():
            raise KeyMissing(
                f"the operator key is not on this server ({keyfile.KEY_FILE} is not in the data "
                "folder: kept offline?); sign with it where it is kept: kluis admin announce "
                "--key FILE, kluis admin wipe --key FILE"
            )
        try:
            return keyfile.load_key(data)
        except LocalProtocolError as exc:
            raise KeyMissing(str(exc)) from None

    async def announce(self, user: AdminUser, text: str) -> int:
        """Sign ``text`` with the operator key and queue it for every active device."""
        self._admin_only(user)
        services = self._services()
        text = text.replace("\r\n", "\n")
        key, info = self._signing_key()
        try:
            envelope = announcements.sign_announcement(key, info.origin, text, self._now())
        except LocalProtocolError as exc:
            raise BadRequest(str(exc)) from None
        queued = await announcements.queue_announcement(services.store, services.mailbox, envelope)
        await self.store.audit(user.name, ANNOUNCE, text[:80], self._now())
        return queued

    async def announcements(self, user: AdminUser) -> list[AuditEntry]:
        self._admin_only(user)
        return await self.store.audit_of(ANNOUNCE)

    async def set_suspended(self, user: AdminUser, account_id: str, suspended: bool) -> None:
        self._admin_only(user)
        try:
            await self._services().subscriptions.set_suspended(account_id, suspended)
        except LocalProtocolError as exc:
            raise BadRequest(str(exc)) from None
        action = "suspend account" if suspended else "reinstate account"
        await self.store.audit(user.name, action, account_id, self._now())

    async def wipe(self, user: AdminUser, account_id: str) -> list[str]:
        """Order every active device of the account wiped, where its policy allows it."""
        self._admin_only(user)
        services = self._services()
        account = await services.store.account(account_id)
        if account is None:
            raise BadRequest(f"no account {account_id!r}")
        if not account.operator_wipe:
            await self.store.audit(user.name, "wipe refused", account_id, self._now())
            raise WipeRefused(
                f"account {account_id}'s policy does not let the operator wipe its devices"
            )
        key, info = self._signing_key()
        devices = [r.keys.ed25519 for r in await services.store.active_devices(account_id)]
        orders = operator_orders(key, info.origin, account_id, devices, self._now())
        for order in orders:
            await services.wipes.order(order, bus=services.bus)
        await self.store.audit(
            user.name, "order wipe", f"{account_id}, {len(devices)} devices", self._now()
        )
        return devices

    @staticmethod
    def _admin_only(user: AdminUser) -> None:
        if user.role != "admin":
            raise Forbidden("this page is for admins")
