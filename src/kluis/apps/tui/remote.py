"""The app attached to ``kluis daemon``: the :class:`~.backend.Backend` protocol over its socket.

Theory of operation: one Unix-socket connection, on the app's own loop (nothing of the client
runs here, only JSON in and out). Each operation is a JSON-RPC request ``app.<operation>``
with an id of its own; a reader task matches answers to their waiting futures, so the app's
workers may have several in flight (a file upload does not hold up a message). ``app.progress``
notifications go to the progress callback of their request; after :meth:`start`, the daemon's
``app.event`` notifications go to ``post``. Values are coded by ``apps/app_rpc.py`` against the
operations' type hints. :meth:`close` closes this connection only: the daemon keeps the profile.
When the daemon goes away, what waits fails with ``TransportError`` and the app shows it
offline, trying the socket again every :data:`RETRY_S` seconds (a daemon started again).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import msgspec

from kluis.apps.app_rpc import (
    MAX_ANSWER,
    TooLong,
    decode_event,
    decode_result,
    encode_params,
    frame,
    lines,
)
from kluis.apps.daemon import SOCKET, hold_shared, holder
from kluis.apps.ops import GroupAction, Offline, Post, Progress
from kluis.apps.peer import foreign
from kluis.apps.quick import DaemonError, kluis_error
from kluis.client.groups import GroupState
from kluis.client.records import Message
from kluis.client.verification import Status, Verification
from kluis.errors import LocalProtocolError, TransportError
from kluis.protocol.attachment import AttachmentRef

RETRY_S = 2.0
GONE = "the kluis daemon stopped"


def held_by_daemon(profile: Path) -> bool:
    """Whether a ``kluis daemon`` holds ``profile`` (its lock, exclusively)."""
    try:
        lock = hold_shared(profile)
    except OSError:  # no lock file can be made there: unlocking will say why
        return False
    if lock is None:
        return True
    lock.close()
    return False


class DaemonBackend:
    """The profile ``profile`` as a running daemon holds it."""

    via = "via daemon"  # the status line says so

    def __init__(self, profile: Path, timeout: float) -> None:
        self.profile = profile
        self._timeout = timeout
        self._account = ""
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._progress: dict[int, Progress] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.Task[None] | None = None
        self._post: Post | None = None
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()  # held: a task nobody holds may vanish

    @classmethod
    async def attach(cls, profile: Path, *, timeout: float = 10.0) -> DaemonBackend:
        """Connect to the daemon holding ``profile``; LocalProtocolError (saying which pid
        holds it) when its socket does not answer."""
        backend = cls(profile, timeout)
        try:
            await backend._connect()
            whoami = await asyncio.wait_for(backend._call("whoami", {}), timeout)
        except (OSError, TimeoutError, TransportError) as exc:
            await backend.close()
            pid = holder(profile)
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise LocalProtocolError(
                f"a kluis daemon (pid {pid}) holds {profile} but its socket"
                f" {profile / SOCKET} does not answer ({why or 'timed out'});"
                f" stop it (kill {pid}) and try again"
            ) from exc
        backend._account = str(whoami["account"])
        return backend

    async def _connect(self) -> None:
        path = str(self.profile / SOCKET)
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), self._timeout)
        why = foreign(writer.get_extra_info("socket"), path)
        if why is not None:  # what the user types would go to it: not even a whoami
            writer.close()
            raise LocalProtocolError(
                f"{why}: nothing is sent to it; check who can write {self.profile}"
            )
        self._writer = writer
        self._reader = asyncio.create_task(self._read(reader))

    # ---- requests -------------------------------------------------------------------------------

    async def _call(
        self, method: str, params: dict[str, Any], progress: Progress | None = None
    ) -> Any:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise TransportError(f"{GONE}: not attached")
        rid = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        if progress is not None:
            self._progress[rid] = progress
        try:
            writer.write(frame({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}))
            await writer.drain()
            return await future
        except ConnectionError as exc:
            raise TransportError(f"{GONE}: {exc}") from exc
        finally:
            self._pending.pop(rid, None)
            self._progress.pop(rid, None)

    async def _op(self, op: str, progress: Progress | None = None, /, **args: Any) -> Any:
        result = await self._call(f"app.{op}", encode_params(op, args), progress)
        try:
            return decode_result(op, result)
        except msgspec.ValidationError as exc:  # a daemon of another version?
            raise LocalProtocolError(f"daemon: unexpected answer to {op}: {exc}") from exc

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            async for line in lines(reader, MAX_ANSWER):
                if isinstance(line, TooLong):
                    break  # whose answer it was is lost: fail what waits rather than hang it
                self._dispatch(line)
        except (ConnectionError, OSError):
            pass
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(TransportError(GONE))
            if self._writer is not None:
                self._writer.close()
            if not self._closed and self._post is not None:
                self._post(Offline(GONE, RETRY_S))
                asyncio.get_running_loop().call_later(RETRY_S, self._retry)

    def _dispatch(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return  # not from a daemon of ours: nothing to do with it
        if not isinstance(message, dict):
            return
        method, params = message.get("method"), message.get("params")
        if "id" in message and method is None:
            rid = message["id"]
            future = self._pending.get(rid) if isinstance(rid, int) else None
            if future is None or future.done():
                return
            error = message.get("error")
            if isinstance(error, dict):
                future.set_exception(kluis_error(DaemonError(error)))
            else:
                future.set_result(message.get("result"))
        elif method == "app.event" and self._post is not None:
            with contextlib.suppress(msgspec.ValidationError):
                self._post(decode_event(params))
        elif method == "app.progress" and isinstance(params, dict):
            rid = params.get("id")
            progress = self._progress.get(rid) if isinstance(rid, int) else None
            done, total = params.get("done"), params.get("total")
            if progress is not None and isinstance(done, int) and isinstance(total, int):
                progress(done, total)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _retry(self) -> None:
        if not self._closed:
            self._spawn(self._reattach())

    async def _reattach(self) -> None:
        try:
            await self._connect()
        except (OSError, TimeoutError):
            if not self._closed and self._post is not None:
                self._post(Offline(GONE, RETRY_S))
                asyncio.get_running_loop().call_later(RETRY_S, self._retry)
            return
        try:
            whoami = await asyncio.wait_for(self._call("whoami", {}), self._timeout)
            if whoami["account"] != self._account:  # another profile there now: not ours
                raise TransportError("another account")
            await self._call("app.subscribe", {})
        except (OSError, TimeoutError, TransportError, LocalProtocolError):
            if self._writer is not None:
                self._writer.close()  # the reader ends, says offline, and tries again

    # ---- the Backend protocol -------------------------------------------------------------------

    @property
    def account_id(self) -> str:
        return self._account

    async def history(self, conversation: str | None = None) -> list[Message]:
        result: list[Message] = await self._op("history", conversation=conversation)
        return result

    async def groups(self) -> list[GroupState]:
        result: list[GroupState] = await self._op("groups")
        return result

    async def quarantined(self) -> int:
        result: int = await self._op("quarantined")
        return result

    async def send(self, conversation: str, text: str, reply_to: bytes = b"") -> Message:
        result: Message = await self._op(
            "send", conversation=conversation, text=text, reply_to=reply_to
        )
        return result

    async def create_group(self, name: str, members: list[str]) -> GroupState:
        result: GroupState = await self._op("create_group", name=name, members=members)
        return result

    async def change_group(
        self, group: str, action: GroupAction, accounts: list[str], name: str | None
    ) -> GroupState:
        result: GroupState = await self._op(
            "change_group", group=group, action=action, accounts=accounts, name=name
        )
        return result

    async def verification_status(self, peer: str) -> tuple[Status, str]:
        result: tuple[Status, str] = await self._op("verification_status", peer=peer)
        return result

    async def start_verification(self, peer: str) -> Verification:
        result: Verification = await self._op("start_verification", peer=peer)
        return result

    async def confirm_verification(self, txn: bytes, match: bool) -> None:
        await self._op("confirm_verification", txn=txn, match=match)

    async def cancel_verification(self, txn: bytes) -> None:
        await self._op("cancel_verification", txn=txn)

    async def contacts(self) -> dict[str, str]:
        result: dict[str, str] = await self._op("contacts")
        return result

    async def set_contact(self, account: str, name: str) -> None:
        await self._op("set_contact", account=account, name=name)

    async def timers(self) -> dict[str, int]:
        result: dict[str, int] = await self._op("timers")
        return result

    async def set_timer(self, conversation: str, seconds: int) -> Message:
        result: Message = await self._op("set_timer", conversation=conversation, seconds=seconds)
        return result

    async def mark_read(self, conversation: str) -> None:
        await self._op("mark_read", conversation=conversation)

    async def renewal_notice(self) -> str:
        result: str = await self._op("renewal_notice")
        return result

    async def outbox_refused(self) -> list[tuple[str, str]]:
        result: list[tuple[str, str]] = await self._op("outbox_refused")
        return result

    async def send_file(
        self, conversation: str, path: Path, caption: str, progress: Progress
    ) -> Message:
        # the daemon opens the file: a path of this machine, as this user (the socket is 0600)
        result: Message = await self._op(
            "send_file", progress, conversation=conversation, path=path.resolve(), caption=caption
        )
        return result

    async def save_file(self, ref: AttachmentRef, folder: Path, progress: Progress) -> Path:
        result: Path = await self._op("save_file", progress, ref=ref, folder=folder.resolve())
        return result

    async def attachment_bytes(self, ref: AttachmentRef, limit: int) -> bytes:
        result: bytes = await self._op("attachment_bytes", ref=ref, limit=limit)
        return result

    def start(self, post: Post) -> None:
        if self._post is None:
            self._post = post
            self._spawn(self._subscribe())

    async def _subscribe(self) -> None:
        with contextlib.suppress(TransportError, LocalProtocolError):
            await self._call("app.subscribe", {})

    async def close(self) -> None:
        """Leave the daemon (it keeps the profile open and goes on)."""
        self._closed = True
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
        for task in (self._reader, *self._tasks):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._reader, *self._tasks) if t is not None), return_exceptions=True
        )
