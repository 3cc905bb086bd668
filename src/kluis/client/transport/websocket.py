"""The client's network transport: one WebSocket, requests matched to answers by ``rid``.

This is the only client module that speaks WebSocket, and the one place where the
``websockets`` library's exceptions become :class:`kluis.errors.TransportError`. It implements
:class:`kluis.client.transport.protocol.Transport`. ``websockets`` rather than aiohttp (which
the server and the file transfers use) because a one-shot command pays for its import: about
50 ms here against aiohttp's 230 (its import makes two TLS contexts, whose CA loading alone is
50 to 90 ms), out of the half second a command may take.

No compression (the frames are ciphertext, and compression beside secrets is how CRIME-style
attacks begin), no proxy from the environment, no User-Agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.protocol import State

from kluis.client.transport.protocol import Push, T, expect_answer, settle_answer
from kluis.errors import KluisError, MalformedFrame, TransportError
from kluis.protocol import frames as f

DEFAULT_TIMEOUT_S = 30.0  # per network step: connecting, and each request's answer
_CLOSE_WAIT_S = 2.0  # for the server's answer to our close frame


def ws_url(url: str) -> str:
    """The server's WebSocket address from its base URL (http -> ws, https -> wss)."""
    url = url.rstrip("/")
    if not url.endswith("/v1/ws"):
        url += "/v1/ws"
    for web, ws in (("http://", "ws://"), ("https://", "wss://")):
        if url.startswith(web):
            return ws + url[len(web) :]
    return url


class WebSocketTransport:
    def __init__(
        self,
        url: str,
        *,
        max_frame_bytes: int = 4 * 1024 * 1024,
        timeout: float = DEFAULT_TIMEOUT_S,
        heartbeat: float | None = None,
    ) -> None:
        self.url = ws_url(url)
        self._max_frame = max_frame_bytes
        # A server that accepts TCP and then says nothing (stopped, overloaded) must not hold a
        # command forever: every step ends within this many seconds with a TransportError.
        self.timeout = timeout
        # With a heartbeat, a ping every this many seconds; no pong within half of it ends the
        # channel. A node that hangs (stopped, partitioned) sends no FIN: without this, only
        # TCP's own keep-alive, after minutes, would tell a client to go elsewhere.
        self.heartbeat = heartbeat
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._rids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[f.ServerFrame]] = {}
        self.pushes: asyncio.Queue[Push | None] = asyncio.Queue()  # None: connection ended
        self.server_origin = ""
        self._close_code: int | None = None  # the server's close code, once known

    async def connect(self, timeout: float | None = None) -> bytes:
        """Open the socket and return the server's challenge nonce."""
        timeout = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(timeout):
                self._ws = await ws_connect(
                    self.url,
                    compression=None,
                    proxy=None,
                    user_agent_header=None,
                    open_timeout=None,  # the timeout above covers TCP, TLS and the upgrade
                    ping_interval=self.heartbeat,
                    ping_timeout=None if self.heartbeat is None else self.heartbeat / 2,
                    close_timeout=_CLOSE_WAIT_S,
                    max_size=self._max_frame,
                )
                first = await self._ws.recv()
        except TimeoutError as exc:
            await self.close()
            raise TransportError(f"no answer from {self.url} within {timeout:g} s") from exc
        except ConnectionClosed as exc:
            await self.close()
            raise TransportError("server closed the connection before the challenge") from exc
        except (InvalidURI, InvalidHandshake, OSError) as exc:
            await self.close()
            raise TransportError(f"cannot connect to {self.url}: {exc}") from exc
        if not isinstance(first, bytes):
            await self.close()
            raise MalformedFrame("server did not start with a binary challenge")
        try:
            challenge = f.decode_server_frame(first)
        except KluisError:
            await self.close()
            raise
        if not isinstance(challenge, f.Challenge):
            await self.close()
            raise MalformedFrame("server did not start with a challenge")
        self.server_origin = challenge.server
        self._reader = asyncio.create_task(self._read(self._ws))
        return challenge.nonce

    async def _read(self, ws: ClientConnection) -> None:
        error: KluisError | None = None
        try:
            with contextlib.suppress(ConnectionClosed):  # how it ended: read below
                async for data in ws:
                    if not isinstance(data, bytes):
                        raise MalformedFrame("the server sent a text frame")
                    frame = f.decode_server_frame(data)
                    if isinstance(frame, f.Deliver | f.KeysLow | f.Synced):
                        self.pushes.put_nowait(frame)
                        continue
                    settle_answer(self._waiting, frame)
            error = self._ended("connection lost", ws)
        except KluisError as exc:
            error = exc
        except OSError as exc:
            error = TransportError(f"connection lost: {exc}")
        finally:
            if error is None:  # close() cancelled the reader: still, the server may have said why
                error = self._ended("connection closed", ws)
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(error)
            self._waiting.clear()
            self.pushes.put_nowait(None)

    async def request(self, make: Callable[[int], f.ClientFrame], expect: type[T]) -> T:
        """Send the frame ``make(rid)`` and return its answer; a server Error is raised typed."""
        ws = self._ws
        if ws is None or ws.state is not State.OPEN:
            raise self._ended("not connected", ws)
        rid = next(self._rids)
        fut: asyncio.Future[f.ServerFrame] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            async with asyncio.timeout(self.timeout):
                await ws.send(f.encode(make(rid)))
                answer = await fut
        except TimeoutError as exc:
            self._waiting.pop(rid, None)
            raise TransportError(f"no answer from the server within {self.timeout:g} s") from exc
        except (ConnectionClosed, OSError) as exc:
            self._waiting.pop(rid, None)
            raise self._ended(f"send failed: {exc}", ws) from exc
        return expect_answer(answer, expect)

    @property
    def close_code(self) -> int | None:
        """The close code the server sent, if it closed the channel first (else None). Read
        from the connection itself: the library answers a close frame at once, before our
        reader has taken it in."""
        if self._close_code is None and self._ws is not None:
            self._close_code = _servers_code(self._ws)
        return self._close_code

    def _ended(self, reason: str, ws: ClientConnection | None) -> TransportError:
        """The error for channel ``ws`` that is gone: with the server's close code when the
        server closed it (1001: the node is draining), else ``reason`` (lost: no close frame
        came, or we closed it first, as after a missed heartbeat or a frame over the limit).
        ``ws`` is the caller's: ``close()`` may have dropped ``self._ws`` meanwhile."""
        code = None if ws is None else _servers_code(ws)
        if code is None:
            return TransportError(reason)
        self._close_code = code
        return TransportError(f"connection closed by server ({code})", close_code=code)

    async def close(self) -> None:
        ws, reader = self._ws, self._reader
        if ws is not None:
            _ = self.close_code  # kept: the server may have said why before we close
            with contextlib.suppress(Exception):
                await ws.close()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        self._ws = self._reader = None


def _servers_code(ws: ClientConnection) -> int | None:
    """The code of the close frame the server sent first, if it did (a received close frame
    never says 1006: that code only names a connection lost without one)."""
    received = ws.protocol.close_rcvd
    if received is None or ws.protocol.close_rcvd_then_sent is False:
        return None
    return received.code
