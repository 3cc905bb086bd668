"""Running a CLI command inside ``kluis daemon``: the command's own code, on the daemon's client.

Theory of operation: while a daemon holds a profile (its lock file held exclusively), no other
process may open that profile: two clients writing one encrypted store would lose each other's
writes. So every profile command of the CLI either works alone, holding the lock *shared* for
as long as it runs, or, when a daemon holds the profile, hands its whole command line to the
daemon (the ``run`` method), which parses it with the CLI's own parser and runs the CLI's own
code with :data:`IN_DAEMON` set to its client: the command opens nothing, asks for no
passphrase and neither connects nor closes (``cli._profile_client`` takes the daemon's client).
What the command prints is captured and sent back with its exit status, so its output is the
same as when it works alone.

Commands run one at a time (they print through ``sys.stdout`` and ``sys.stderr``, redirected
for the run; the daemon logs to the stream it started with). Only the commands of
:data:`COMMANDS` run so: they read nothing from standard input, and the one path they take,
``fetch --out``, is made absolute against the caller's folder. ``send`` and ``inbox`` have
their own methods (standard input; printed before acknowledged), and a ``register``, an
interactive ``verify``, a ``wipe`` (the daemon's own ``wipe`` method) or a server command
never runs in the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import sys
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kluis.errors import KluisError, LocalProtocolError

if TYPE_CHECKING:
    from kluis.client.client import KluisClient

IN_DAEMON: ContextVar[KluisClient | None] = ContextVar("kluis_in_daemon", default=None)

# first word -> the subcommands allowed (None: the command has none, or all are allowed)
COMMANDS: dict[str, frozenset[str] | None] = {
    "contact": None,
    "conversations": None,
    "device": frozenset({"approve", "list", "name", "revoke"}),
    "fetch": None,
    "group": None,
    "history": None,
    "licence": frozenset({"renew"}),
    "notes": None,
    "outbox": None,
    "receipts": None,
    "safety-number": None,
    "timer": None,
    "trust": None,
    "verify": None,  # with --status only: the comparison itself asks at the terminal
    "whoami": None,
}
_SUBCOMMAND = ("action", "group_command")  # where the CLI's parser puts a subcommand's name
_PATHS = ("out",)  # options holding a path (relative to the caller's folder)


@dataclass(frozen=True, slots=True)
class Result:
    code: int
    stdout: str
    stderr: str


def refusal(args: argparse.Namespace) -> str | None:
    """Why the parsed command ``args`` may not run in the daemon, or None when it may."""
    command = str(getattr(args, "command", ""))
    if command not in COMMANDS:
        return f"`kluis {command}` does not run through the daemon"
    allowed = COMMANDS[command]
    sub = next((getattr(args, name) for name in _SUBCOMMAND if hasattr(args, name)), None)
    if allowed is not None and sub not in allowed:
        return f"`kluis {command} {sub}` does not run through the daemon"
    if command == "verify" and not args.status:
        return "an interactive verify does not run through the daemon: use kluis chat (F7)"
    return None


async def run_command(
    client: KluisClient, profile: Path, argv: Sequence[str], cwd: str, turn: asyncio.Lock
) -> Result:
    """Run the command line ``argv`` (as typed in folder ``cwd``) on ``client``, the daemon's
    client of ``profile``; ``turn`` lets one command run at a time."""
    async with turn:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = await _run(client, profile, list(argv), Path(cwd))
        return Result(code, out.getvalue(), err.getvalue())


async def _run(client: KluisClient, profile: Path, argv: list[str], cwd: Path) -> int:
    from kluis.apps import cli as cli_module  # the daemon has loaded it already

    try:
        args = cli_module.build_parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (2) or --help (0): argparse printed it
        return exc.code if isinstance(exc.code, int) else 2
    token = IN_DAEMON.set(client)
    try:
        reason = refusal(args)
        if reason is None and (cwd / args.profile).resolve() != profile:
            reason = f"this daemon holds {profile}, not {args.profile}"
        if reason is not None:
            pid = os.getpid()
            raise LocalProtocolError(
                f"{reason}, and a kluis daemon (pid {pid}) holds {profile}:"
                f" stop it first (kill {pid})"
            )
        for name in _PATHS:
            if getattr(args, name, None) is not None:
                setattr(args, name, str(cwd / getattr(args, name)))
        coroutine = getattr(args.func, "coroutine", None)
        if coroutine is not None:
            await coroutine(args)
        else:
            args.func(args)
    except KluisError as exc:
        cli_module._report(exc, "error")
        return 1
    except SystemExit as exc:  # as Python prints one: a message is one line on stderr, status 1
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    finally:
        IN_DAEMON.reset(token)
    return 0
