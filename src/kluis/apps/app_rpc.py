"""The app's side of the daemon's socket: line framing, the codec, and the ``app.*`` methods.

Theory of operation: an app attached to ``kluis daemon`` calls the operations of
:class:`~kluis.apps.ops.ClientOps` as JSON-RPC methods ``app.<operation>`` (named parameters,
as in the Python signature) on one connection, several at once: each request has its id, the
daemon answers each as it completes (a file upload does not hold up a message). Values go as
JSON through ``msgspec.to_builtins`` and come back through ``msgspec.convert`` against the
operation's type hints, so records (Message, GroupState, Verification, AttachmentRef: bytes as
base64, datetimes as RFC 3339, enums as their values) are checked on the way in and round-trip
exactly. The daemon also sends notifications:

    app.event    {"kind": "MessageReceived", "event": {...}}   to a connection that subscribed
    app.progress {"id": REQUEST_ID, "done": N, "total": N}     of a send_file/save_file request

``app.subscribe {}`` starts the events, the current connection state (Online or Offline) first.
Lines are at most :data:`MAX_REQUEST` bytes towards the daemon (a longer one is answered with
``-32600`` and skipped, and the connection goes on) and :data:`MAX_ANSWER` back (a preview is
at most ``ops.MAX_ATTACHMENT_BYTES``, in base64). Errors are JSON-RPC's: -32700 parse error,
-32600 invalid request, -32601 no such method, -32602 invalid params, -32603 internal error,
-32000 a Kluis error (its code in ``data.code``).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import time
import typing
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec

from kluis.apps.ops import (
    EVENT_KINDS,
    OPERATIONS,
    BackendEvent,
    ClientOps,
    Offline,
    Online,
    Progress,
)
from kluis.errors import LocalProtocolError

MAX_REQUEST = 1024 * 1024  # bytes in a request line (a long text, a file path: far less)
# bytes in an answer line: a 16 MiB preview is 22 MiB in base64; a whole history of 100,000
# messages about 40 MiB. The app drops a connection that sends a longer one.
MAX_ANSWER = 256 * 1024 * 1024
MAX_BACKLOG = 64 * 1024 * 1024  # unread bytes towards a connection before it is dropped
PROGRESS_EVERY_S = 0.1  # at most one progress notification per request this often (and the end)

PARSE_ERROR, INVALID_REQUEST, NO_METHOD, INVALID_PARAMS, INTERNAL_ERROR = (
    -32700,
    -32600,
    -32601,
    -32602,
    -32603,
)
KLUIS_ERROR = -32000


class RpcError(Exception):
    """A request the daemon refuses with a JSON-RPC ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class TooLong:
    """A line longer than the limit (its bytes were skipped)."""


async def lines(reader: asyncio.StreamReader, limit: int) -> AsyncIterator[bytes | TooLong]:
    """The lines of ``reader`` without their newline; :class:`TooLong` for one over ``limit``
    bytes, whose rest is skipped up to its newline (the next line is read as usual)."""
    buffer = bytearray()
    skipping = False
    while chunk := await reader.read(256 * 1024):
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if skipping:
                skipping = False
            else:
                yield line if len(line) <= limit else TooLong()
        if len(buffer) > limit:
            if not skipping:
                yield TooLong()
            skipping = True
            buffer.clear()


# ---- the codec ------------------------------------------------------------------------------


def _enc_hook(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


def _dec_hook(type_: type, value: object) -> object:
    if type_ is Path and isinstance(value, str):
        return Path(value)
    raise NotImplementedError(f"cannot decode {type_}")


def encode(value: object) -> Any:
    """``value`` as JSON-ready builtins."""
    return msgspec.to_builtins(value, enc_hook=_enc_hook)


def decode(value: object, type_: Any) -> Any:
    """``value`` (builtins) checked and converted to ``type_``; msgspec.ValidationError if not."""
    return msgspec.convert(value, type_, dec_hook=_dec_hook)


class Signature(typing.NamedTuple):
    params: dict[str, Any]  # name -> type, in order
    required: frozenset[str]
    returns: Any
    progress: bool  # the operation takes a progress callback


@functools.cache
def signature(name: str) -> Signature:
    """The wire schema of operation ``name``: its type hints."""
    method = getattr(ClientOps, name)
    hints = typing.get_type_hints(method)
    returns = hints.pop("return")
    progress = hints.pop("progress", None) is not None
    defaults = inspect.signature(method).parameters
    required = frozenset(
        p for p in hints if defaults[p].default is inspect.Parameter.empty and p != "progress"
    )
    return Signature(hints, required, returns, progress)


def encode_params(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {key: encode(value) for key, value in args.items() if key != "progress"}


def decode_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The arguments of operation ``name``; RpcError(INVALID_PARAMS) for anything else."""
    sig = signature(name)
    unknown = set(params) - set(sig.params)
    missing = sig.required - set(params)
    if unknown or missing:
        raise RpcError(
            INVALID_PARAMS,
            f"invalid params: {name} takes {', '.join(sig.params) or 'nothing'}"
            f" (unknown: {sorted(unknown)}, missing: {sorted(missing)})",
        )
    try:
        return {key: decode(value, sig.params[key]) for key, value in params.items()}
    except msgspec.ValidationError as exc:
        raise RpcError(INVALID_PARAMS, f"invalid params: {exc}") from exc


def decode_result(name: str, result: object) -> Any:
    return decode(result, signature(name).returns)


_KINDS: dict[str, type[BackendEvent]] = {kind.__name__: kind for kind in EVENT_KINDS}


def encode_event(event: BackendEvent) -> dict[str, Any]:
    return {"kind": type(event).__name__, "event": encode(event)}


def decode_event(params: object) -> BackendEvent:
    """An event notification's params; msgspec.ValidationError for anything else."""
    if not isinstance(params, dict) or params.get("kind") not in _KINDS:
        raise msgspec.ValidationError(f"not an event: {params!r:.80}")
    event: BackendEvent = decode(params.get("event"), _KINDS[params["kind"]])
    return event


def frame(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


# ---- the daemon's side ----------------------------------------------------------------------


class Connection:
    """One socket connection to the daemon: whole lines written, in order, never interleaved
    (each line is one ``write``; answers then wait for the buffer to drain)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._drain = asyncio.Lock()

    def push(self, message: dict[str, Any]) -> None:
        """Queue ``message`` (a notification); a connection that stopped reading is dropped."""
        if self.writer.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() > MAX_BACKLOG:
            self.writer.close()
            return
        self.writer.write(frame(message))

    async def send(self, message: dict[str, Any]) -> None:
        self.push(message)
        async with self._drain:
            if not self.writer.is_closing():
                await self.writer.drain()


class AppService:
    """The ``app.*`` methods of the daemon over its one client, and the events it publishes."""

    def __init__(self, ops: ClientOps) -> None:
        self.ops = ops
        self.subscribers: set[Connection] = set()
        self.state: BackendEvent = Offline("connecting", 0.0)

    def publish(self, event: BackendEvent) -> None:
        if isinstance(event, Online | Offline):
            self.state = event
        message = {"jsonrpc": "2.0", "method": "app.event", "params": encode_event(event)}
        for connection in list(self.subscribers):
            connection.push(message)

    def gone(self, connection: Connection) -> None:
        self.subscribers.discard(connection)

    async def call(
        self, name: str, params: dict[str, Any], connection: Connection, rid: object
    ) -> Any:
        if name == "subscribe":
            if params:
                raise RpcError(INVALID_PARAMS, "invalid params: subscribe takes nothing")
            self.subscribers.add(connection)
            connection.push(
                {"jsonrpc": "2.0", "method": "app.event", "params": encode_event(self.state)}
            )
            return {}
        if name not in OPERATIONS:
            raise RpcError(NO_METHOD, f"no method 'app.{name}'")
        kwargs = decode_params(name, params)
        if signature(name).progress:
            kwargs["progress"] = _progress(connection, rid)
        try:
            result = await getattr(self.ops, name)(**kwargs)
        except OSError as exc:  # a file to send or a folder to save in
            raise LocalProtocolError(f"{exc.strerror or exc}: {exc.filename or ''}") from exc
        except TypeError as exc:  # the params were checked above: this is a bug, not the caller's
            raise RuntimeError(f"app.{name} failed") from exc
        return encode(result)


def _progress(connection: Connection, rid: object) -> Progress:
    last = 0.0

    def progress(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if done < total and now - last < PROGRESS_EVERY_S:
            return
        last = now
        params = {"id": rid, "done": done, "total": total}
        connection.push({"jsonrpc": "2.0", "method": "app.progress", "params": params})

    return progress
