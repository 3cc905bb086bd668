"""``kluis admin create-user``: console users from the command line (the first admin).

On PostgreSQL it takes ``--database URL`` beside ``--data``: the users go into the shared
database, and their TOTP secrets are sealed under ``DATA/admin.key``, which every node's data
folder must hold (a copy of the same file).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kluis.errors import LocalProtocolError
from kluis.server.config import ServerConfig

if TYPE_CHECKING:
    from kluis.server.admin.store import Role


def _password() -> str:
    password = os.environ.get("KLUIS_ADMIN_PASSWORD")
    if password:
        return password
    password = getpass.getpass("Console password (12+ characters): ")
    if getpass.getpass("Again: ") != password:
        raise LocalProtocolError("the two passwords differ")
    return password


def _admin_config(args: argparse.Namespace) -> ServerConfig:
    """The node's configuration for an admin command: ``--data`` always (``admin.key`` and the
    operator key live there), and ``--database`` on PostgreSQL."""
    config = ServerConfig(data_dir=Path(args.data), database_url=args.database)
    if config.database_url is None:
        if not config.database_path.exists():
            raise LocalProtocolError(f"{args.data} holds no Kluis database; check --data")
        return config
    if not config.database_url.startswith(("postgresql://", "postgres://")):
        raise LocalProtocolError("--database takes a postgresql://... URL")
    if not config.data_dir.is_dir():
        # admin.key must be the one every node has: a typo must not make a new one.
        raise LocalProtocolError(
            f"{args.data} is not a folder; --data names a node's data folder (with admin.key)"
        )
    return config


def cmd_create_user(args: argparse.Namespace) -> None:
    config = _admin_config(args)
    if args.quota is not None and args.role != "reseller":
        raise LocalProtocolError("--quota is for resellers")
    role: Role = "reseller" if args.role == "reseller" else "admin"
    password = _password()

    # Not at import: every `kluis` command builds the parser that names these commands.
    from kluis.server.admin import credentials as cred
    from kluis.server.admin.console import ConsoleError, create_user
    from kluis.server.admin.store import admin_store_for

    async def run() -> str:
        from kluis.server.app import open_store

        store = open_store(config)
        try:
            admin_store = admin_store_for(store)
            assert admin_store is not None  # SQLite or PostgreSQL: both keep the console
            box = cred.SecretBox.open(config.data_dir)
            return await create_user(
                admin_store,
                box,
                args.name,
                role,
                password,
                args.quota or 0,
                int(time.time()),
                "cli",
            )
        except ConnectionError as exc:  # PostgreSQL down or the URL wrong
            raise LocalProtocolError(str(exc)) from exc
        finally:
            await store.close()

    try:
        uri = asyncio.run(run())
    except ConsoleError as exc:
        raise LocalProtocolError(str(exc)) from exc
    print(uri)


def add_commands(admin: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cu = admin.add_parser(
        "create-user", help="a console user; prints the TOTP provisioning URI (once)"
    )
    cu.add_argument("--data", required=True, help="the server's data folder (holds admin.key)")
    cu.add_argument(
        "--database", metavar="URL", help="the server's postgresql://... database, if on PostgreSQL"
    )
    cu.add_argument("name")
    cu.add_argument(
        "--role", choices=["admin", "reseller"], default="admin", help="default: %(default)s"
    )
    cu.add_argument(
        "--quota", type=int, help="how many licence codes a reseller may create (default 0)"
    )
    cu.set_defaults(func=cmd_create_user)
