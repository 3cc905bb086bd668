"""The client's network transport: one WebSocket, requests matched to answers by ``rid``.

This is the only client module that does network I/O, and the one place where aiohttp's
exceptions become :class:`kluis.errors.TransportError`. It implements
:class:`kluis.client.transport.protocol.Transport`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable

import aiohttp

from kluis.client.transport.protocol import Push, T, expect_answer, settle_answer
from kluis.errors import KluisError, MalformedFrame, TransportError
from kluis.protocol import frames as f

DEFAULT_TIMEOUT_S = 30.0  # per network step: connecting, and each request's answer


class WebSocketTransport:
    def __init__(
        self,
        url: str,
        *,
        max_frame_bytes: int = 4 * 1024 * 1024,
        timeout: float = DEFAULT_TIMEOUT_S,
        heartbeat: float | None = None,
    ) -> None:
        self.url = url.rstrip("/") + "/v1/ws" if not url.rstrip("/").endswith("/v1/ws") else url
        self._max_frame = max_frame_bytes
        # A server that accepts TCP and then says nothing (stopped, overloaded) must not hold a
        # command forever: every step ends within this many seconds with a TransportError.
        self.timeout = timeout
        # With a heartbeat, a ping every this many seconds; no pong within half of it ends the
        # channel (1006). A node that hangs (stopped, partitioned) sends no FIN: without this,
        # only TCP's own keep-alive, after minutes, would tell a client to go elsewhere.
        self.heartbeat = heartbeat
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._rids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[f.ServerFrame]] = {}
        self.pushes: asyncio.Queue[Push | None] = asyncio.Queue()  # None: connection ended
        self.server_origin = ""
        self.close_code: int | None = None  # set when the server closed the socket

    async def connect(self, timeout: float | None = None) -> bytes:
        """Open the socket and return the server's challenge nonce."""
        timeout = self.timeout if timeout is None else timeout
        self._session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(timeout):
                self._ws = await self._session.ws_connect(
                    self.url,
                    max_msg_size=self._max_frame,
                    timeout=aiohttp.ClientWSTimeout(ws_close=2),
                    heartbeat=self.heartbeat,
                )
                first = await self._ws.receive()
        except TimeoutError as exc:
            await self.close()
            raise TransportError(f"no answer from {self.url} within {timeout:g} s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            await self.close()
            raise TransportError(f"cannot connect to {self.url}: {exc}") from exc
        if first.type != aiohttp.WSMsgType.BINARY:
            await self.close()
            raise TransportError("server closed the connection before the challenge")
        challenge = f.decode_server_frame(first.data)
        if not isinstance(challenge, f.Challenge):
            await self.close()
            raise MalformedFrame("server did not start with a challenge")
        self.server_origin = challenge.server
        self._reader = asyncio.create_task(self._read())
        return challenge.nonce

    async def _read(self) -> None:
        assert self._ws is not None
        error: KluisError = TransportError("connection closed")
        try:
            lost: object = None
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    if msg.type == aiohttp.WSMsgType.ERROR:  # e.g. no pong to a heartbeat
                        lost = msg.data or "error"
                    break
                frame = f.decode_server_frame(msg.data)
                if isinstance(frame, f.Deliver | f.KeysLow | f.Synced):
                    self.pushes.put_nowait(frame)
                    continue
                settle_answer(self._waiting, frame)
            if lost is not None:
                error = TransportError(f"connection lost: {type(lost).__name__}")
            elif self._ws.close_code is not None:
                self.close_code = self._ws.close_code
                reason = f"connection closed by server ({self._ws.close_code})"
                error = TransportError(reason, close_code=self._ws.close_code)
        except KluisError as exc:
            error = exc
        except (aiohttp.ClientError, OSError) as exc:
            error = TransportError(f"connection lost: {exc}")
        finally:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(error)
            self._waiting.clear()
            self.pushes.put_nowait(None)

    async def request(self, make: Callable[[int], f.ClientFrame], expect: type[T]) -> T:
        """Send the frame ``make(rid)`` and return its answer; a server Error is raised typed."""
        if self._ws is None or self._ws.closed:
            raise self._ended("not connected")
        rid = next(self._rids)
        fut: asyncio.Future[f.ServerFrame] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            async with asyncio.timeout(self.timeout):
                await self._ws.send_bytes(f.encode(make(rid)))
                answer = await fut
        except TimeoutError as exc:
            self._waiting.pop(rid, None)
            raise TransportError(f"no answer from the server within {self.timeout:g} s") from exc
        except (aiohttp.ClientError, OSError, ConnectionError) as exc:
            self._waiting.pop(rid, None)
            raise self._ended(f"send failed: {exc}") from exc
        return expect_answer(answer, expect)

    def _ended(self, reason: str) -> TransportError:
        """The error for a request on a socket that is gone: with the server's close code when
        it closed it (1001: the node is draining), which our reader may not have seen yet."""
        code = self._ws.close_code if self._ws is not None else None
        if code is None or code == aiohttp.WSCloseCode.ABNORMAL_CLOSURE:  # 1006: never sent
            return TransportError(reason)
        self.close_code = code
        return TransportError(f"connection closed by server ({code})", close_code=code)

    async def close(self) -> None:
        if self._ws is not None and not self._ws.closed:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._session is not None:
            await self._session.close()
        self._ws = self._session = self._reader = None
