"""The WebSocket transport of ``/v1/ws``: feeds frames to a Connection, writes what it answers.

Theory of operation: aiohttp parses incoming frames; everything the server sends after the
``Challenge`` goes through one :class:`Outbox` per connection. Replies and pushes queue up there
and are written once per event-loop turn as ONE transport write holding every WebSocket frame
(unmasked binary frames, built here). Measurement (BENCHMARKS.md) showed that the ``write``
system call was the largest single cost of a message; a receiver's acknowledgement reply and
the next delivery usually leave in the same turn and now share one call. There is no writer task
per connection: the flush is a loop callback, which also keeps idle connections small.

Order on the wire: within one turn, replies go before pushes and deliveries before notices, so a
login answers ``Welcome``, then the stored backlog, then ``Synced``. When the client does not read
(the transport buffer is above ``_HIGH_WATER``), pushes wait in the Connection and the reader
stops taking requests until the buffer drains, as aiohttp's own flow control would. A backlog
is written one page per turn, the next page only when the buffer has drained.

On SIGTERM the node drains (``server/drain.py``): the handler registers itself there, is
marked busy while it handles a request, and when asked to go closes with 1001 after its answer.

Before login a client may send ``max_prelogin_bytes`` in all (its one login frame): a
:class:`PreLoginGate` in front of aiohttp's frame reader counts them, so an unauthenticated
connection never makes the server hold a large unfinished frame.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from kluis.errors import FrameTooLarge, MalformedFrame
from kluis.protocol import frames as f
from kluis.server.connection import Connection, Services, State
from kluis.server.drain import DRAIN, Live

SERVICES = web.AppKey("services", Services)  # set by server/app.py

# The transport accepts frames up to this multiple of the configured limit so that a frame a
# little too large gets a typed error on a live connection; far larger ones close it (1009).
_HARD_FRAME_FACTOR = 4
_HIGH_WATER = 1 << 20  # bytes buffered for one client before pushes wait and reading pauses
_RETRY_S = 0.01
# How long a close waits for the peer's answering close frame. aiohttp's default (10 s) doubled
# the life of a silent unauthenticated socket; a live client answers in a round trip.
_CLOSE_WAIT_S = 0.5

_LEN2 = struct.Struct("!BBH")
_LEN3 = struct.Struct("!BBQ")


def binary_frame(payload: bytes) -> bytes:
    """One final, unmasked binary WebSocket frame (RFC 6455 5.2), as a server sends it."""
    n = len(payload)
    if n < 126:
        return bytes((0x82, n)) + payload
    if n < 65536:
        return _LEN2.pack(0x82, 126, n) + payload
    return _LEN3.pack(0x82, 127, n) + payload


class Outbox:
    """Coalesces one connection's replies and pushes into one write per event-loop turn."""

    __slots__ = ("_conn", "_handle", "_loop", "_replies", "_transport", "_woken", "_ws")

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport) -> None:
        self._ws = ws
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._replies: list[bytes] = []
        self._handle: asyncio.Handle | None = None
        self._conn: Connection | None = None
        self._woken = False  # the handler was woken to close (see flush)

    def attach(self, conn: Connection) -> None:
        self._conn = conn

    def wake(self) -> None:
        """Pushes are waiting (the Connection's wake callback), or a close was requested."""
        if self._handle is None:
            self._handle = self._loop.call_soon(self.flush)

    def reply(self, frame: bytes) -> None:
        self._replies.append(frame)
        self.wake()

    @property
    def congested(self) -> bool:
        return self._transport.get_write_buffer_size() > _HIGH_WATER

    def flush(self) -> None:
        self._handle = None
        transport, conn = self._transport, self._conn
        if transport.is_closing():
            self._replies = []
            return
        out = self._replies
        self._replies = []
        if conn is not None:
            if self.congested:  # the client is not reading: hold pushes, look again soon
                self._handle = self._loop.call_later(_RETRY_S, self.flush)
            else:
                out.extend(conn.take_outgoing())
                if conn.backlog and not conn.reading:  # the next page, once this one has left
                    self._handle = self._loop.call_soon(self.flush)
        if out:
            transport.write(b"".join([binary_frame(p) for p in out]))
        if conn is not None and conn.close_requested and not self._woken:
            # replaced, revoked, wiped: the handler closes (1008) once woken, with the whole
            # close handshake (server/drain.py says why not from here)
            self._woken = True
            wake_receive(self._ws)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class PreLoginGate:
    """Stands in front of aiohttp's WebSocket reader: until :meth:`open`, a client may send
    ``budget`` bytes in all; one byte more and the connection is closed with 1009.

    aiohttp fixes the reader's frame limit when the response is created and its C reader does
    not let it be changed; this counts bytes instead, so memory per unauthenticated connection
    is bounded by ``budget``, while a logged-in client gets the full frame limit.
    """

    __slots__ = ("_budget", "_parser", "_transport")

    def __init__(self, parser: Any, transport: asyncio.Transport, budget: int) -> None:
        self._parser, self._transport, self._budget = parser, transport, budget

    def open(self) -> None:
        self._budget = -1

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._budget >= 0:
            self._budget -= len(data)
            if self._budget < 0:  # before login, and over: a close frame (1009) and goodbye
                reason = (
                    struct.pack("!H", WSCloseCode.MESSAGE_TOO_BIG) + FrameTooLarge.code.encode()
                )
                self._transport.write(bytes((0x88, len(reason))) + reason)
                self._transport.close()
                return True, b""
        result: tuple[bool, bytes] = self._parser.feed_data(data)
        return result

    def feed_eof(self) -> None:
        self._parser.feed_eof()


class _Wake(Exception):
    """What :func:`wake_receive` hands a handler's ``receive()``: look at the connection's
    state (the node is draining, or the connection must close)."""


WAKE = _Wake("the handler has a close to make")


def wake_receive(ws: web.WebSocketResponse) -> None:
    """Make the handler's pending ``ws.receive()`` return an ERROR message holding
    :data:`WAKE`, after the frames already read: a close is the handler's to make, with the
    whole close handshake (server/drain.py says why). The aiohttp internal its own heartbeat uses to wake a receive()
    (3.14: ``WebSocketResponse._reader.feed_data``); if aiohttp renames it, this raises and
    tests/test_drain.py fails."""
    reader = getattr(ws, "_reader", None)
    if reader is None or not hasattr(reader, "feed_data"):
        raise RuntimeError("aiohttp changed: no WebSocket reader to wake")
    reader.feed_data(WSMessage(WSMsgType.ERROR, WAKE, None), 0)


def install_gate(request: web.Request, budget: int) -> PreLoginGate:
    """Put a :class:`PreLoginGate` in front of the reader that ``ws.prepare`` installed.

    The one place that touches aiohttp internals (3.14: ``RequestHandler._payload_parser``,
    which receives every byte after the upgrade). If aiohttp renames it, this raises and
    tests/integration/test_review_findings_server.py fails; it never fails open silently.
    """
    protocol = request.protocol
    parser = getattr(protocol, "_payload_parser")  # noqa: B009 - private on purpose, see above
    transport = request.transport
    if parser is None or not hasattr(parser, "feed_data") or transport is None:
        raise RuntimeError("aiohttp changed: no WebSocket reader to gate")
    gate = PreLoginGate(parser, transport, budget)
    setattr(protocol, "_payload_parser", gate)  # noqa: B010
    return gate


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    limits = services.limits
    ws = web.WebSocketResponse(
        max_msg_size=limits.max_frame_bytes * _HARD_FRAME_FACTOR,
        compress=False,
        heartbeat=60,
        timeout=_CLOSE_WAIT_S,
    )
    await ws.prepare(request)
    transport = request.transport
    if transport is None:  # the client left during the handshake
        return ws
    gate = install_gate(request, limits.max_prelogin_bytes)
    outbox = Outbox(ws, transport)
    conn = Connection(services, outbox.wake)
    outbox.attach(conn)
    drain = request.app.get(DRAIN)
    live = Live(ws, outbox.flush, lambda: wake_receive(ws))
    if drain is not None:
        drain.add(live)
    try:
        await ws.send_bytes(f.encode(f.Challenge(nonce=conn.nonce, server=services.origin)))
        loop = asyncio.get_running_loop()
        auth_deadline = loop.time() + limits.auth_timeout_s  # a deadline: frames do not extend it
        while True:
            if live.going:  # the node is draining: the last answer, then 1001 (server/drain.py)
                await live.close()
                break
            if conn.close_requested:  # the reply, then the close (revoked itself, or replaced)
                outbox.flush()
                await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=conn.close_reason)
                break
            while outbox.congested and not transport.is_closing():
                await asyncio.sleep(_RETRY_S)  # flow control: read no more until it drains
            timeout = None
            if conn.state is not State.AUTHENTICATED:  # a pending link device only waits
                timeout = max(0.0, auth_deadline - loop.time())
            try:
                msg = await ws.receive(timeout=timeout)
            except TimeoutError:
                outbox.flush()
                await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"auth timeout")
                break
            if msg.type == WSMsgType.BINARY:
                live.busy = True  # a drain lets this request finish and answer (server/drain.py)
                try:
                    outbox.reply(await conn.handle(msg.data))
                finally:
                    live.busy = False
                if conn.state is State.AUTHENTICATED:
                    gate.open()
            elif msg.type == WSMsgType.TEXT:
                err = MalformedFrame("frames are binary msgpack")
                outbox.reply(f.encode(f.Error(rid=None, code=err.code, message=err.message)))
            elif msg.type == WSMsgType.ERROR:
                if msg.data is WAKE:
                    continue  # a close to make: at the top of the loop
                if isinstance(msg.data, Exception) and "too big" in str(msg.data).lower():
                    outbox.flush()
                    code = FrameTooLarge.code
                    await ws.close(code=WSCloseCode.MESSAGE_TOO_BIG, message=code.encode())
                break
            else:  # CLOSE, CLOSING, CLOSED
                break
    finally:
        if drain is not None:
            drain.discard(live)
        conn.closed()
        outbox.cancel()
        if not ws.closed:
            await ws.close()
    return ws
