"""``kluis daemon``: one unlocked profile, one connection, a JSON-RPC 2.0 socket for the CLI
and the app.

Theory of operation: the daemon takes the profile's lock file (``daemon.lock``, an exclusive
``flock``), unlocks the profile with the passphrase, and follows ``KluisClient.events()``,
reconnecting with back-off and jitter: messages are received, stored and acknowledged as they
come, so ``kluis inbox`` only has to show what is stored and not shown yet. It listens on
``daemon.sock`` in the profile folder (mode 0600, in a folder that must be 0700: whoever can
reach the socket can use the account, as with signal-cli), one JSON-RPC 2.0 request per line,
one response per line. Methods:

    whoami {}                              -> {"account": ID, "ends": DAY|null, "notice": T}
    send {"to": ID|GROUP, "text": T}       -> {"to": LABEL}        (or "file": PATH, "caption")
    inbox {"wait": SECONDS}                -> {"messages": [{"seq", "line", "json"}]}  not shown yet
    shown {"seq": N}                       -> {"read": COUNT}  printed up to N: shown, read
    history {"conversation": ID|GROUP|null} -> {"messages": [{"line", "json"}]}
    run {"argv": [ARG, ...], "cwd": DIR}   -> {"code": N, "stdout": T, "stderr": T}
                                              any other profile command of the CLI, run by
                                              the CLI's own code on this client
                                              (apps/through_daemon.py)
    wipe {}                                -> {"wiped": true}  erase the profile, then exit
    app.subscribe {}                       -> {}   then app.event notifications (the app's)
    app.<operation> {NAME: VALUE, ...}     -> the value   ClientOps' operations, typed by their
                                              hints (``apps/app_rpc.py``, ``apps/ops.py``)

Each request of a connection is answered in a task of its own, in the order they complete (so
several may be in flight: match answers by id), and the lines of a connection never interleave.
A request line longer than ``app_rpc.MAX_REQUEST`` bytes is refused (-32600) and skipped; a
connection goes on after any bad request.

A Kluis error answers ``{"code": -32000, "message": ..., "data": {"code": KLUIS_CODE}}``; a
send that cannot reach the server is kept in the outbox (``not_sent``).

Every profile command of the CLI takes the same lock *shared* when it works alone, so the daemon
and a command never both hold the profile: a command that finds the lock taken talks to the
socket, and says so clearly when nothing answers there; ``kluis chat`` does the same (working
alone it holds the lock shared while the profile is open; else it attaches). A new message
while no app has subscribed to events raises a notification without its content
(``notify-send``, else the terminal bell on stderr). After ``--lock-after`` seconds without a
request, and without an app subscribed, the daemon *locks by exiting*: it
forgets the key, closes the profile, removes its socket and releases the lock, so the next
command works alone (or a new ``kluis daemon`` asks for the passphrase again).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from kluis.apps.cli import _day, account_label, message_json, message_line
from kluis.apps.peer import foreign, peer_uid
from kluis.apps.quick import Channel, DaemonError, kluis_error
from kluis.client.backoff import Backoff, BackoffPolicy
from kluis.client.events import (
    DeviceAlarm,
    MessageReceived,
    Undecryptable,
)

if TYPE_CHECKING:  # the client side of this module (Rpc) needs no network stack
    from kluis.apps.app_rpc import AppService, Connection
    from kluis.apps.ops import BackendEvent
    from kluis.client.client import KluisClient
    from kluis.client.records import Message
    from kluis.client.transport import TransportFactory
from kluis.errors import KluisError, LocalProtocolError, NotSent, TransportError

SOCKET = "daemon.sock"
LOCK = "daemon.lock"
DEFAULT_LOCK_AFTER_S = 900.0
_BACKOFF = BackoffPolicy(base_s=1.0, cap_s=60.0, stable_after_s=10.0, jitter="equal")
_KLUIS_ERROR = -32000


def check_folder(profile: Path) -> None:
    """Refuse a profile folder that others than its owner can open."""
    mode = profile.stat().st_mode
    if stat.S_IMODE(mode) & 0o077:
        raise LocalProtocolError(
            f"{profile} is open to group or others (mode {stat.S_IMODE(mode):o});"
            f" run chmod 700 {profile} first"
        )


def _lock(profile: Path, how: int) -> IO[str] | None:
    """The lock file, held ``how``; None when someone else holds it the other way."""
    fd = os.open(profile / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    handle = os.fdopen(fd, "r+")
    try:
        fcntl.flock(handle, how | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def hold_shared(profile: Path) -> IO[str] | None:
    """The profile's lock held shared (close it to let go), as a command or the app working
    alone holds it; None when a daemon holds the profile."""
    return _lock(profile, fcntl.LOCK_SH)


def holder(profile: Path) -> str:
    """The pid of the daemon that holds ``profile`` ("?" if it does not say)."""
    try:
        return (profile / LOCK).read_text().strip() or "?"
    except OSError:
        return "?"


# ---- the daemon -----------------------------------------------------------------------------


class Daemon:
    def __init__(self, client: KluisClient, profile: Path, lock_after: float) -> None:
        self.client = client
        self.profile = profile
        self.lock_after = lock_after
        self.busy = 0  # requests being answered
        self.stop = asyncio.Event()
        self.arrived = asyncio.Event()  # set on each new message (inbox waits on it)
        self.reason = ""
        self._last = 0.0
        self._turn = asyncio.Lock()  # one CLI command at a time (they print through sys.stdout)
        self._following: asyncio.Task[None] | None = None
        # the daemon's own log: sys.stderr is redirected while a CLI command runs in it
        self.log = sys.stderr
        from kluis.apps.app_rpc import AppService  # loads the client's records: not for Rpc
        from kluis.apps.ops import ClientOps

        self.app: AppService = AppService(ClientOps(client))

    async def run(self) -> str:
        """Serve until idle for ``lock_after`` or told to stop; return why it stopped."""
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        path = self.profile / SOCKET
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale socket: we hold the lock, so nobody serves it
        old = os.umask(0o177)  # the socket is born 0600: no moment where others may connect
        try:
            server = await asyncio.start_unix_server(self._serve, path=str(path))
        except OSError as exc:
            raise LocalProtocolError(f"cannot listen on {path}: {exc}") from exc
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, "stopped")
        follow = self._following = asyncio.create_task(self._follow())
        idle = asyncio.create_task(self._idle())
        print(
            f"daemon: {self.client.account_id} listening on {path};"
            f" locks after {self.lock_after:g} s idle",
            file=self.log,
            flush=True,
        )
        try:
            await self.stop.wait()
        finally:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            for task in (follow, idle):
                task.cancel()
            await asyncio.gather(follow, idle, return_exceptions=True)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return self.reason

    def _stop(self, reason: str) -> None:
        self.reason = self.reason or reason
        self.stop.set()

    async def _idle(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.lock_after / 4))
            if self.app.subscribers:  # an app is open on the profile: not idle
                self._last = loop.time()
            elif self.busy == 0 and loop.time() - self._last >= self.lock_after:
                self._stop(f"locked after {self.lock_after:g} s idle")
                return

    async def _follow(self) -> None:
        # client/backoff.py: 0.5-1 s first, doubling to 30-60 s; a stable connection resets it,
        # and a node that drains (1001) is left at once for another.
        from kluis.apps.ops import follow

        loop = asyncio.get_running_loop()
        backoff = Backoff(_BACKOFF, clock=loop.time, random=random.random)

        def failed(exc: Exception) -> None:
            print(f"daemon: {exc}", file=self.log, flush=True)

        await follow(self.client, backoff, self._heard, retry_on=(KluisError,), failed=failed)

    def _heard(self, event: BackendEvent) -> None:
        """An event of the stream (see ops.follow): to the attached apps, and what the daemon
        itself does with it."""
        self.app.publish(event)
        if isinstance(event, MessageReceived):
            self.arrived.set()
            mine = event.message.sender == self.client.account_id
            if not self.app.subscribers and not mine:
                notify(self.log)
        elif isinstance(event, Undecryptable):
            print(f"warning: a message could not be read: {event.code}", file=self.log, flush=True)
        elif isinstance(event, DeviceAlarm):
            print(f"ALARM: {event.alarm}", file=self.log, flush=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from kluis.apps.app_rpc import MAX_REQUEST, Connection, TooLong, lines

        peer = writer.get_extra_info("socket")
        if peer is not None and peer_uid(peer) not in (None, os.getuid()):
            writer.close()  # the socket is 0600: only another user's process gets here if ever
            return
        connection = Connection(writer)
        tasks: set[asyncio.Task[None]] = set()
        try:
            async for line in lines(reader, MAX_REQUEST):
                if isinstance(line, TooLong):
                    message = f"invalid request: longer than {MAX_REQUEST} bytes"
                    await connection.send(_error(None, -32600, message))
                    continue
                # each request in a task of its own: a slow one does not hold up the next; a
                # request outlives its connection (it completes; its answer is dropped)
                task = asyncio.create_task(self._request(line, connection))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except ConnectionError:
            pass
        finally:
            self.app.gone(connection)
            writer.close()

    async def _request(self, line: bytes, connection: Connection) -> None:
        loop = asyncio.get_running_loop()
        self.busy += 1
        self._last = loop.time()
        try:
            answer = await self._answer(line, connection)
            if answer is not None:
                await connection.send(answer)
        except ConnectionError:
            pass
        finally:
            self.busy -= 1
            self._last = loop.time()

    async def _answer(self, line: bytes, connection: Connection) -> dict[str, Any] | None:
        try:
            request = json.loads(line)
        except ValueError:
            return _error(None, -32700, "parse error")
        if not isinstance(request, dict) or request.get("jsonrpc") != "2.0":
            return _error(None, -32600, "invalid request")
        rid = request.get("id")
        method, params = request.get("method"), request.get("params", {})
        if not isinstance(method, str) or not isinstance(params, dict):
            return _error(rid, -32600, "invalid request")
        from kluis.apps.app_rpc import RpcError

        try:
            if method.startswith("app."):
                result = await self.app.call(method[4:], params, connection, rid)
            else:
                handler = getattr(self, f"rpc_{method}", None)
                if handler is None:
                    return _error(rid, -32601, f"no method {method!r}")
                result = await handler(**params)
        except RpcError as exc:
            return _error(rid, exc.code, str(exc))
        except TypeError as exc:
            return _error(rid, -32602, f"invalid params: {exc}")
        except KluisError as exc:
            return _error(rid, _KLUIS_ERROR, exc.message, {"code": exc.code})
        except Exception as exc:  # a bug, or input nothing checked: the daemon goes on
            # the type only: an unexpected error's text may quote what it was given
            print(f"daemon: {method}: {type(exc).__name__}", file=self.log, flush=True)
            return _error(rid, -32603, f"internal error: {type(exc).__name__}")
        if "id" not in request:
            return None  # a notification gets no answer
        return {"jsonrpc": "2.0", "id": rid, "result": result}

    # ---- methods

    async def rpc_whoami(self) -> dict[str, Any]:
        end = self.client.subscription_end
        return {
            "account": self.client.account_id,
            "ends": _day(end) if end is not None else None,
            "notice": self.client.renewal_notice(),
        }

    async def rpc_send(
        self,
        to: str,
        text: str = "",
        file: str | None = None,
        caption: str = "",
        reply_to: str | None = None,
    ) -> dict[str, Any]:
        if not isinstance(to, str) or not isinstance(text, str):
            raise TypeError("to and text are strings")
        if reply_to is not None and not isinstance(reply_to, str):
            raise TypeError("reply_to is hex digits of a message ID")
        quoted = b"" if reply_to is None else self.client.core.find_by_prefix(to, reply_to).id
        if file is not None:
            await self.client.send_file(to, file, caption)
        elif not self.client.connected:
            self.client.keep(to, text, reply_to=quoted)
            raise NotSent("kept in the outbox (the daemon is offline)")
        else:
            await self.client.send(to, text, reply_to=quoted)
        return {"to": account_label(to, self.client.contacts())}

    async def rpc_inbox(self, wait: float = 0.0) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(wait)
        while True:
            self.arrived.clear()
            unshown = self.client.core.unshown()
            if unshown or loop.time() >= deadline:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline - loop.time()):
                    await self.arrived.wait()
        names = self.client.contacts()
        return {
            "messages": [{"seq": seq, **self._shown(m, names, receipt=False)} for seq, m in unshown]
        }

    def _shown(self, m: Message, names: dict[str, str], *, receipt: bool) -> dict[str, Any]:
        quote = self.client.quoted(m)
        return {
            "line": message_line(m, names, receipt=receipt, quote=quote),
            "json": json.loads(message_json(m, quote)),
        }

    async def rpc_shown(self, seq: int) -> dict[str, Any]:
        read = {m.conversation for s, m in self.client.core.unshown() if s <= int(seq)}
        self.client.core.shown(int(seq))
        count = 0
        for conversation in sorted(read):
            with contextlib.suppress(TransportError):  # offline: they go with the next send
                count += await self.client.mark_read(conversation)
        return {"read": count}

    async def rpc_history(self, conversation: str | None = None) -> dict[str, Any]:
        names = self.client.contacts()
        messages = self.client.history(conversation)
        self.client.core.features.conversations.mark_read(conversation)
        return {"messages": [self._shown(m, names, receipt=True) for m in messages]}

    async def rpc_run(self, argv: list[str], cwd: str) -> dict[str, Any]:
        from kluis.apps.through_daemon import run_command

        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise TypeError("argv is a list of strings")
        if not isinstance(cwd, str) or not os.path.isabs(cwd):
            raise TypeError("cwd is an absolute path")
        result = await run_command(self.client, self.profile, argv, cwd, self._turn)
        return {"code": result.code, "stdout": result.stdout, "stderr": result.stderr}

    async def rpc_wipe(self) -> dict[str, Any]:
        """``kluis wipe`` while the daemon holds the profile: stop following, close the
        profile, erase it, and exit (the key goes with the process)."""
        from kluis.client.wipe import erase_profile

        async with self._turn:
            if self._following is not None:
                self._following.cancel()
                await asyncio.gather(self._following, return_exceptions=True)
            await self.client.close()
            erase_profile(self.profile)
            self._stop("the profile was wiped")
        return {"wiped": True}


def _error(rid: object, code: int, message: str, data: object = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": rid, "error": error}


def notify(log: IO[str] | None = None) -> None:
    """A desktop notification that something arrived, never what (else a bell on ``log``)."""
    if shutil.which("notify-send"):
        with contextlib.suppress(OSError):
            subprocess.Popen(
                ["notify-send", "Kluis", "new message"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            return
    log = log or sys.stderr
    log.write("\a")
    log.flush()


async def run(
    profile: Path, passphrase: str, *, lock_after: float, transport_factory: TransportFactory
) -> None:
    """``kluis daemon``: hold ``profile`` until idle for ``lock_after`` seconds or stopped."""
    if lock_after <= 0:
        raise LocalProtocolError("--lock-after must be more than 0 seconds")
    if not profile.is_dir():
        raise LocalProtocolError(f"no profile at {profile}")
    profile = profile.resolve()  # commands run in it name paths from their own folders
    check_folder(profile)
    lock = _lock(profile, fcntl.LOCK_EX)
    if lock is None:
        raise LocalProtocolError(
            f"{profile} is in use (another kluis daemon, a command or kluis chat holds"
            f" {profile / LOCK})"
        )
    try:
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        from kluis.client.client import KluisClient

        client = KluisClient.open(profile, passphrase, transport_factory=transport_factory)
        try:
            reason = await Daemon(client, profile, lock_after).run()
        finally:
            await client.close()
        print(f"daemon: {reason}; the key is forgotten", file=sys.stderr, flush=True)
    finally:
        lock.close()


# ---- the CLI's side -------------------------------------------------------------------------


class Rpc(Channel):
    """The fast path's connection to a running daemon, its failures as Kluis errors."""

    def call(self, method: str, params: dict[str, Any], *, longer: float = 0.0) -> Any:
        try:
            return super().call(method, params, longer=longer)
        except (DaemonError, OSError) as exc:
            raise kluis_error(exc) from exc


@contextlib.contextmanager
def daemon_or_alone(profile: Path, timeout: float) -> Iterator[Rpc | None]:
    """The daemon holding ``profile``, or None with the profile's lock held shared for the
    caller, which then works alone (the daemon cannot start meanwhile)."""
    if not profile.is_dir():
        yield None  # no profile: the caller says so
        return
    lock = _lock(profile, fcntl.LOCK_SH)
    if lock is not None:
        try:
            yield None
        finally:
            lock.close()
        return
    path = profile / SOCKET
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        pid = holder(profile)
        raise LocalProtocolError(
            f"a kluis daemon (pid {pid}) holds {profile} but its socket {path} does not answer"
            f" ({exc.strerror or exc}); stop it (kill {pid}) and try again"
        ) from exc
    why = foreign(sock, str(path))
    if why is not None:
        sock.close()
        raise LocalProtocolError(f"{why}: nothing is sent to it; check who can write {profile}")
    rpc = Rpc(sock, timeout)
    try:
        yield rpc
    finally:
        rpc.close()
