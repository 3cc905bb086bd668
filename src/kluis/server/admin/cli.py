"""``kluis admin create-user``: console users from the command line (the first admin)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import time
from pathlib import Path

from kluis.errors import LocalProtocolError
from kluis.server.admin import credentials as cred
from kluis.server.admin.console import ConsoleError, create_user
from kluis.server.admin.store import AdminStore, Role
from kluis.server.config import ServerConfig
from kluis.server.store.sqlite import SqliteStore


def _password() -> str:
    password = os.environ.get("KLUIS_ADMIN_PASSWORD")
    if password:
        return password
    password = getpass.getpass("Console password (12+ characters): ")
    if getpass.getpass("Again: ") != password:
        raise LocalProtocolError("the two passwords differ")
    return password


def cmd_create_user(args: argparse.Namespace) -> None:
    config = ServerConfig(data_dir=Path(args.data))
    if not config.database_path.exists():
        raise LocalProtocolError(f"{args.data} holds no Kluis database; check --data")
    if args.quota is not None and args.role != "reseller":
        raise LocalProtocolError("--quota is for resellers")
    role: Role = "reseller" if args.role == "reseller" else "admin"
    password = _password()

    async def run() -> str:
        store = SqliteStore(config.database_path)
        try:
            box = cred.SecretBox.open(config.data_dir)
            return await create_user(
                AdminStore(store),
                box,
                args.name,
                role,
                password,
                args.quota or 0,
                int(time.time()),
                "cli",
            )
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
    cu.add_argument("--data", required=True, help="the server's data folder")
    cu.add_argument("name")
    cu.add_argument(
        "--role", choices=["admin", "reseller"], default="admin", help="default: %(default)s"
    )
    cu.add_argument(
        "--quota", type=int, help="how many licence codes a reseller may create (default 0)"
    )
    cu.set_defaults(func=cmd_create_user)
