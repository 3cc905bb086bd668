"""Graceful drain: on SIGTERM a node sends its clients elsewhere and lets in-flight work finish.

Theory of operation: every WebSocket handler registers a :class:`Live` record in the node's
:class:`Drain` for as long as it runs, and marks it ``busy`` while a request is being handled
(a Send committing, say). :meth:`Drain.run`, once the listening socket is closed (no new
connections), asks each connection to go: an idle one is woken out of its ``receive()`` and
closes with 1001 ("going away") at once, after what its outbox holds; a busy one finishes its
request, writes the answer, and closes itself with 1001 (the handler checks
:attr:`Live.going` after each request). Either way the handler closes the WebSocket itself,
with the whole close handshake: closed from another task while its ``receive()`` waits,
aiohttp would close the socket at once, and with the client's last frames unread there the
kernel answers with a reset, which can make the client lose our close frame and its 1001. A client
that sees 1001 reconnects at once, through the balancer, to another node; nothing it was told
was accepted is lost, since accepted means committed. A connection that arrives while draining
(accepted before the socket closed) is sent away as soon as it registers. The drain waits for
the handlers to end, at most ``timeout`` seconds: whatever is left then is cut by the runner's
shutdown, and the node exits anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aiohttp import WSCloseCode, web

log = logging.getLogger("kluis.server")

GOING_AWAY_REASON = b"going away"


class Live:
    """One running WebSocket handler, as the drain sees it."""

    __slots__ = ("busy", "flush", "going", "wake", "ws")

    def __init__(
        self, ws: web.WebSocketResponse, flush: Callable[[], None], wake: Callable[[], None]
    ) -> None:
        self.ws, self.flush = ws, flush  # flush: write what the connection's outbox holds
        self.wake = wake  # makes the handler's pending receive() return (see the handler)
        self.busy = False  # handling a request: it closes itself once answered
        self.going = False  # asked to go

    async def go_away(self) -> None:
        """Ask to go: the handler closes now when idle (woken), else after the request in
        hand."""
        self.going = True
        if not self.busy:
            self.wake()

    async def close(self) -> None:
        self.flush()
        with contextlib.suppress(Exception):
            await self.ws.close(code=WSCloseCode.GOING_AWAY, message=GOING_AWAY_REASON)


class Drain:
    """The live connections of one node, and the drain of them."""

    def __init__(self) -> None:
        self.live: set[Live] = set()
        self.draining = False
        self._empty = asyncio.Event()
        self._empty.set()

    def add(self, live: Live) -> None:
        self.live.add(live)
        self._empty.clear()
        if self.draining:
            live.going = True  # the handler sends it away before reading anything

    def discard(self, live: Live) -> None:
        self.live.discard(live)
        if not self.live:
            self._empty.set()

    async def run(self, timeout: float) -> int:
        """Send every connection away and wait for the handlers to end, at most ``timeout``
        seconds; return how many were still running then (0: a clean drain)."""
        self.draining = True
        log.info("draining %d connections", len(self.live))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(live.go_away() for live in list(self.live)))
                await self._empty.wait()
        if self.live:
            log.warning("drain timed out with %d connections open", len(self.live))
        return len(self.live)


DRAIN = web.AppKey("drain", Drain)  # set by server/app.py; the WebSocket handler registers in it
