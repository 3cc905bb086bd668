"""Subscriptions: licence plans, renewal, expiry and suspension.

Theory of operation: a licence code carries a number of days (from a named plan or given); it
creates an account (``Accounts.register``) or extends one (:meth:`Subscriptions.renew`): the new
end is the later of now and the current end, plus the days, so renewing early loses nothing.
An account past its end still logs in and receives what was queued, but cannot send
(``AccountExpired`` naming the date). A suspended account cannot log in at all
(``AccountSuspended``, told only after the login signature checked out); suspension is kept apart
from expiry, so reinstating gives back whatever time was left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from kluis.errors import AccountExpired, AccountSuspended, LicenceInvalid, LocalProtocolError
from kluis.server.accounts import licence_hash, new_licence_code
from kluis.server.store.protocol import Account, Store

DEFAULT_DAYS = 182
PLANS: dict[str, int] = {"month": 31, "quarter": 91, "half-year": DEFAULT_DAYS, "year": 365}
NOTICE_DAYS = 14  # clients show a renewal notice from this many days before the end


@dataclass(frozen=True, slots=True)
class Licence:
    code: str
    plan: str
    days: int


def plan_days(plan: str | None, days: int | None) -> tuple[str, int]:
    """The (plan, days) of ``--plan`` or ``--days`` (default: half a year)."""
    if plan is not None and days is not None:
        raise LocalProtocolError("give --plan or --days, not both")
    if plan is not None:
        if plan not in PLANS:
            raise LocalProtocolError(f"unknown plan {plan!r}; plans: {', '.join(PLANS)}")
        return plan, PLANS[plan]
    days = DEFAULT_DAYS if days is None else days
    if not 1 <= days <= 36_500:
        raise LocalProtocolError("--days must be 1..36500")
    return next((p for p, d in PLANS.items() if d == days), f"{days}-days"), days


def day(stamp: int) -> str:
    """A subscription end as users read it: the UTC date."""
    return datetime.fromtimestamp(stamp, UTC).date().isoformat()


def expired_error(account: Account) -> AccountExpired:
    return AccountExpired(
        f"subscription ended on {day(account.expires_at)}; renew with kluis licence renew"
    )


class Subscriptions:
    def __init__(self, store: Store, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock

    def _now(self) -> int:
        return int(self._clock())

    async def create(self, count: int, plan: str, days: int) -> list[Licence]:
        if not 1 <= count <= 100_000:
            raise LocalProtocolError("--count must be 1..100000")
        codes = [new_licence_code() for _ in range(count)]
        await self._store.add_plan_licences(
            [licence_hash(c) for c in codes], days, plan, self._now()
        )
        return [Licence(c, plan, days) for c in codes]

    async def renew(self, account_id: str, code: str) -> int:
        """Redeem ``code`` for ``account_id``; return the new end (unix seconds)."""
        expires = await self._store.renew(licence_hash(code), account_id, self._now())
        if expires is None:
            raise LicenceInvalid("licence code is unknown or already redeemed")
        return expires

    def check_login(self, account: Account) -> None:
        if account.suspended:
            raise AccountSuspended("this account is suspended; ask your operator")

    def check_send(self, account: Account) -> None:
        self.check_login(account)
        if account.expires_at <= self._now():
            raise expired_error(account)

    async def set_suspended(self, account_id: str, suspended: bool) -> None:
        if not await self._store.set_account_flag(account_id, "suspended", suspended):
            raise LocalProtocolError(f"no account {account_id!r}")

    async def set_operator_wipe(self, account_id: str, allowed: bool) -> None:
        if not await self._store.set_account_flag(account_id, "operator_wipe", allowed):
            raise LocalProtocolError(f"no account {account_id!r}")
