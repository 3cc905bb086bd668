"""The ``kluis`` command's entry point: a running daemon answers the common commands at once.

Theory of operation: loading the whole CLI (the client, its crypto, aiohttp, rich) costs more
than a hundred milliseconds before any work starts. With ``kluis daemon`` holding the profile
unlocked and connected, ``send``, ``inbox``, ``history`` and ``whoami`` need only one JSON-RPC
exchange over the daemon's Unix socket. So this module, which imports nothing but the standard
library, recognises those four commands in their plain forms, checks that a daemon holds the
profile (its lock file is held exclusively), and asks it, printing what the full CLI prints
through the daemon. The other profile commands the daemon runs (:data:`_THROUGH`) are handed
to it whole (its ``run`` method parses the line with the full CLI's parser and runs the CLI's
own code: apps/through_daemon.py), so they cost one exchange too. Everything else goes to the
full CLI (``kluis.apps.cli.main``) unchanged: another command, ``--help``, no daemon, a socket
that does not answer. An error the daemon reports is printed by the full CLI's own code, loaded
only then, so its wording and hints are the same on both paths.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kluis.apps.peer import foreign

if TYPE_CHECKING:
    from typing import Any

    from kluis.errors import KluisError

# Kept equal to kluis.apps.cli.DEFAULT_TIMEOUT_S (a test checks it): importing it costs the CLI.
DEFAULT_TIMEOUT_S = 30.0
SOCKET, LOCK = "daemon.sock", "daemon.lock"  # as kluis.apps.daemon names them (a test checks)
# command: (least, most positionals), the options it may take here
_COMMANDS = {
    "send": (2, 2, {"--profile"}),
    "inbox": (0, 0, {"--profile", "--wait", "--json"}),
    "history": (0, 1, {"--profile", "--json"}),
    "whoami": (0, 0, {"--profile"}),
}
_FLAGS = {"--json"}
# the first words of the commands a daemon runs whole (kluis.apps.through_daemon.COMMANDS;
# a test checks they are the same)
_THROUGH = frozenset(
    {
        "contact",
        "conversations",
        "device",
        "fetch",
        "group",
        "history",
        "licence",
        "notes",
        "outbox",
        "receipts",
        "safety-number",
        "timer",
        "trust",
        "verify",
        "whoami",
    }
)


class Plain:
    """A command line this module can answer through a daemon (a plain class: importing
    dataclasses would cost more than the rest of this module)."""

    __slots__ = ("command", "json", "positionals", "profile", "timeout", "wait")

    def __init__(
        self, command: str, profile: str, timeout: float, *, json: bool, positionals: list[str]
    ) -> None:
        self.command, self.profile, self.timeout = command, profile, timeout
        self.json, self.positionals = json, positionals
        self.wait = 0.0


def parse(argv: Sequence[str]) -> Plain | None:
    """``argv`` as a :class:`Plain` command, or None when the full CLI must read it."""
    timeout, args = _timeout(argv)
    if timeout is None:
        return None  # the full CLI refuses it in its own words
    if not args or args[0] not in _COMMANDS:
        return None
    command, rest = args[0], args[1:]
    least, most, allowed = _COMMANDS[command]
    options: dict[str, str | None] = {}
    positionals: list[str] = []
    while rest:
        token = rest[0]
        name = token.partition("=")[0]
        if token in _FLAGS and token in allowed:
            options[token] = None
            rest = rest[1:]
        elif name in allowed and name not in _FLAGS:
            value, rest = _take(rest, name)
            if value is None:
                return None
            options[name] = value
        elif token.startswith("-") and token != "-":
            return None  # --help, --file, an abbreviation, "--": the full CLI's business
        else:
            positionals.append(token)
            rest = rest[1:]
    profile = options.get("--profile")
    if profile is None or not least <= len(positionals) <= most:
        return None
    plain = Plain(command, profile, timeout, json="--json" in options, positionals=positionals)
    if "--wait" in options:
        wait = _number(options["--wait"])
        if wait is None:
            return None
        plain.wait = wait
    return plain


def whole(argv: Sequence[str]) -> tuple[str, float] | None:
    """(profile, timeout) when ``argv`` is a command a daemon may run whole, else None."""
    timeout, args = _timeout(argv)
    if timeout is None:
        return None
    if not args or args[0] not in _THROUGH or {"-h", "--help", "--"} & set(args):
        return None
    profiles = []
    rest = args[1:]
    while rest:
        if rest[0] == "--profile" or rest[0].startswith("--profile="):
            value, rest = _take(rest, "--profile")
            profiles.append(value)
        else:
            rest = rest[1:]
    if len(profiles) != 1 or profiles[0] is None:
        return None  # the full CLI says what is wrong
    return profiles[0], timeout


def _timeout(argv: Sequence[str]) -> tuple[float | None, list[str]]:
    """The global ``--timeout`` (None: not a positive number), and the words after it."""
    args = list(argv)
    if not args or not (args[0] == "--timeout" or args[0].startswith("--timeout=")):
        return DEFAULT_TIMEOUT_S, args
    value, args = _take(args, "--timeout")
    number = _number(value)
    return (number if number is not None and number > 0 else None), args


def _take(args: list[str], name: str) -> tuple[str | None, list[str]]:
    """The value of option ``name`` at the head of ``args`` (``--x V`` or ``--x=V``), the rest."""
    head = args[0]
    if head.startswith(name + "="):
        return head[len(name) + 1 :], args[1:]
    if len(args) < 2:
        return None, args[1:]
    return args[1], args[2:]


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


class DaemonError(Exception):
    """The daemon answered with an error (``error`` is the JSON-RPC error object)."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", ""))
        self.error = error


class Channel:
    """One JSON-RPC connection to the daemon (blocking: a command does one thing at a time).
    Failures are DaemonError (the daemon's answer) or OSError; ``kluis.apps.daemon.Rpc`` is the
    same with Kluis errors (:func:`kluis_error`)."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self._sock, self._file, self._timeout, self._ids = sock, sock.makefile("rb"), timeout, 0

    def call(self, method: str, params: dict[str, Any], *, longer: float = 0.0) -> Any:
        self._ids += 1
        request = {"jsonrpc": "2.0", "id": self._ids, "method": method, "params": params}
        self._sock.settimeout(self._timeout + longer)
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        line = self._file.readline()
        if not line:
            raise OSError("the kluis daemon closed the connection")
        answer = json.loads(line)
        if "error" in answer:
            raise DaemonError(answer["error"])
        return answer["result"]

    def close(self) -> None:
        self._file.close()
        self._sock.close()


def connect(profile: str, timeout: float) -> Channel | None:
    """The daemon holding ``profile``, or None when none does (or its socket does not answer:
    the full CLI then says so in its own words)."""
    try:
        fd = os.open(os.path.join(profile, LOCK), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # held exclusively: a daemon runs
    else:
        return None  # nobody holds it exclusively: no daemon (the lock goes with the close)
    finally:
        os.close(fd)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    path = os.path.join(profile, SOCKET)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    if foreign(sock, path) is not None:  # the full CLI refuses it, in its own words
        sock.close()
        return None
    return Channel(sock, timeout)


def run(plain: Plain, channel: Channel) -> None:
    """Answer ``plain`` through the daemon; print as the full CLI does."""
    if plain.command == "send":
        to, text = plain.positionals
        if text == "-":
            text = sys.stdin.read()
        answer = channel.call("send", {"to": to, "text": text})
        print(f"sent to {answer['to']}")
    elif plain.command == "inbox":
        deadline = time.monotonic() + plain.wait
        while True:  # printed first, then acknowledged as shown (as the full CLI does)
            wait = max(0.0, deadline - time.monotonic())
            got = channel.call("inbox", {"wait": wait}, longer=wait)["messages"]
            for m in got:
                print(json.dumps(m["json"]) if plain.json else m["line"], flush=True)
            if got:
                channel.call("shown", {"seq": got[-1]["seq"]})
            if time.monotonic() >= deadline:
                return
    elif plain.command == "history":
        conversation = plain.positionals[0] if plain.positionals else None
        for m in channel.call("history", {"conversation": conversation})["messages"]:
            print(json.dumps(m["json"]) if plain.json else m["line"], flush=True)
    else:
        answer = channel.call("whoami", {})
        print(answer["account"])
        if answer.get("ends"):  # stderr: stdout stays the bare ID, as scripts take it
            print(f"subscription ends on {answer['ends']}", file=sys.stderr)
        if answer.get("notice"):
            print(answer["notice"], file=sys.stderr)


def kluis_error(exc: DaemonError | OSError) -> KluisError:
    """A failure of a :class:`Channel` as the Kluis error the full CLI reports (the error tree
    loaded only now): the daemon's own Kluis error by its code, else a local or transport one."""
    from kluis.errors import LocalProtocolError, TransportError, error_for_code

    if isinstance(exc, OSError):
        return TransportError(f"the kluis daemon did not answer: {exc}")
    data = exc.error.get("data")
    code = data.get("code") if isinstance(data, dict) else None
    if isinstance(code, str) and code:
        return error_for_code(code, str(exc))
    return LocalProtocolError(f"daemon: {exc}")


def _report(exc: DaemonError | OSError) -> int:
    """The full CLI's wording for a failure on the fast path (loaded only now)."""
    from kluis.apps import cli
    from kluis.errors import NotSent

    err = kluis_error(exc)
    if isinstance(err, NotSent):
        print(f"{cli.NOT_SENT} ({err.message})", file=sys.stderr)
    else:
        cli._report(err, "error")
    return 1


def run_whole(argv: Sequence[str], channel: Channel, timeout: float) -> int:
    """Have the daemon run the command line ``argv``; print what it printed; its exit status.
    (The full CLI calls it too, with its own Channel.)"""
    fetch = _timeout(argv)[1][:1] == ["fetch"]
    longer = 600.0 if fetch else 3 * timeout  # downloads take longer
    answer = channel.call("run", {"argv": list(argv), "cwd": os.getcwd()}, longer=longer)
    sys.stdout.write(answer["stdout"])
    sys.stdout.flush()
    sys.stderr.write(answer["stderr"])
    return int(answer["code"])


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    plain = parse(arguments)
    target = whole(arguments) if plain is None else (plain.profile, plain.timeout)
    channel = connect(*target) if target is not None else None
    if channel is None:
        from kluis.apps.cli import main as full

        return full(arguments)
    # As the full CLI: Ctrl-C ends the command even when started with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if plain is None:
            assert target is not None
            return run_whole(arguments, channel, target[1])
        run(plain, channel)
    except (DaemonError, OSError) as exc:
        return _report(exc)
    except ValueError as exc:  # not JSON: not our daemon
        return _report(OSError(f"unreadable answer ({exc})"))
    except KeyboardInterrupt:
        return 130
    finally:
        channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
