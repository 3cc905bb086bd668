"""What the operator's commands do to a node's data folder, apart from a running server:
licences with plans (and their CSV), suspension and the wipe policy, announcements and wipe
orders signed with the operator key, schema migrations (``kluis migrate``). Each works on the
SQLite store in the data folder or, with ``--database``, on PostgreSQL; the operator key stays
in the data folder (or ``--key``) either way. Each call opens the store, does one thing and closes it;
the admin console can call the services underneath (``Subscriptions``, ``Wipes``,
``announcements``) on the live server's store instead.

A running server sees what these write at the device's next login (a suspension, a wipe order,
an announcement for a device that is online: at its next login or next message; sending is
re-checked within 30 s).
"""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from kluis.errors import LocalProtocolError
from kluis.server.config import ServerConfig
from kluis.server.delivery.memory import InProcessBus
from kluis.server.mailbox import Mailbox
from kluis.server.operator import announcements, keyfile
from kluis.server.operator.subscriptions import Licence, Subscriptions
from kluis.server.operator.wipe import Wipes, operator_orders
from kluis.server.store.protocol import Store
from kluis.server.store.sqlite import SqliteStore

_T = TypeVar("_T")


def _with_store(config: ServerConfig, fn: Callable[[Store], Awaitable[_T]]) -> _T:
    """``fn`` on the node's store: SQLite in the data folder, or PostgreSQL (``--database``)."""
    if not config.on_postgres and not config.database_path.exists():
        raise LocalProtocolError(f"{config.data_dir} holds no Kluis database; check --data")
    from kluis.server.app import open_store  # the app wires the operator's services too

    async def run() -> _T:
        store = open_store(config)
        try:
            return await fn(store)
        except ConnectionError as exc:  # PostgreSQL down or the URL wrong
            raise LocalProtocolError(str(exc)) from exc
        finally:
            await store.close()

    return asyncio.run(run())


def migrate(config: ServerConfig) -> str:
    """Create or upgrade the node's store to the current schema; one line saying where it is."""
    if config.on_postgres:
        from kluis.server.app import is_database_url
        from kluis.server.store.postgres import MIGRATIONS, migrate_database

        if not is_database_url(config.database_url or ""):
            raise LocalProtocolError("--database takes a postgresql://... URL")

        try:
            before, after = asyncio.run(migrate_database(config.database_url or ""))
        except ConnectionError as exc:
            raise LocalProtocolError(str(exc)) from exc
        latest = MIGRATIONS[-1][0]
        if after > latest:  # a newer Kluis migrated it: this one must not serve it
            return f"PostgreSQL schema at version {after}, newer than this Kluis ({latest})"
        if before == after:
            return f"PostgreSQL schema at version {after} (latest): nothing to do"
        return f"PostgreSQL schema at version {after} (latest), was {before}"
    path = config.database_path
    existed = path.exists()

    async def run() -> None:
        await SqliteStore(path).close()  # opening creates or upgrades it, in one transaction

    asyncio.run(run())
    how = "upgraded where it lagged" if existed else "created"
    return f"SQLite database {path} at the current schema ({how})"


def create_licences(config: ServerConfig, count: int, plan: str, days: int) -> list[Licence]:
    """New codes (the database is made when missing: ``--init`` is checked by the caller)."""

    from kluis.server.app import open_store  # the app wires the operator's services too

    async def run() -> list[Licence]:
        store = open_store(config)  # SQLite in the data folder, or PostgreSQL (--database)
        try:
            return await Subscriptions(store, time.time).create(count, plan, days)
        except ConnectionError as exc:  # PostgreSQL unreachable: one line, no traceback
            raise LocalProtocolError(str(exc)) from exc
        finally:
            await store.close()

    return asyncio.run(run())


def licences_csv(licences: list[Licence]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["code", "plan", "days"])
    for lic in licences:
        writer.writerow([lic.code, lic.plan, lic.days])
    return out.getvalue()


def write_private(path: Path, text: str) -> None:
    """Codes are money: the CSV is readable by its owner only."""
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)


def set_account(config: ServerConfig, account_id: str, action: str) -> None:
    async def run(store: Store) -> None:
        subs = Subscriptions(store, time.time)
        if action in ("suspend", "reinstate"):
            await subs.set_suspended(account_id, action == "suspend")
        elif action in ("allow-wipe", "deny-wipe"):
            await subs.set_operator_wipe(account_id, action == "allow-wipe")
        else:
            raise LocalProtocolError(f"unknown action {action!r}")

    _with_store(config, run)


def announce(config: ServerConfig, text: str, key_file: Path | None = None) -> int:
    """Sign ``text`` and queue it for every active device; return how many."""
    key, info = keyfile.load_key(config.data_dir, key_file)
    envelope = announcements.sign_announcement(key, info.origin, text, int(time.time()))

    async def run(store: Store) -> int:
        mailbox = Mailbox(store, config.limits, time.time, InProcessBus())
        return await announcements.queue_announcement(store, mailbox, envelope)

    return _with_store(config, run)


def wipe(
    config: ServerConfig, account_id: str, device: str | None, key_file: Path | None = None
) -> list[str]:
    """Order ``device`` (or every device) of the account wiped, signed by the operator key."""
    key, info = keyfile.load_key(config.data_dir, key_file)

    async def run(store: Store) -> list[str]:
        account = await store.account(account_id)
        if account is None:
            raise LocalProtocolError(f"no account {account_id!r}")
        if not account.operator_wipe:
            raise LocalProtocolError("this account's policy does not let the operator wipe")
        targets = [r.keys.ed25519 for r in await store.active_devices(account_id)]
        if device is not None:
            if device not in targets:
                raise LocalProtocolError(f"no active device {device!r} in this account")
            targets = [device]
        wipes = Wipes(store, info.origin, info.public_key)
        for order in operator_orders(key, info.origin, account_id, targets, int(time.time())):
            await wipes.order(order)
        return targets

    return _with_store(config, run)
