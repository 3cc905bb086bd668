"""A loopback TCP load balancer for tests: what HAProxy does in front of a real deployment.

Theory of operation: :class:`Balancer` listens on a loopback port; each accepted connection goes
to the next backend in round-robin order. A backend that refuses (a killed node, a draining node
that closed its listener) or does not answer within ``connect_timeout`` is skipped for the next
one; when every backend refuses, the client's connection is closed. Bytes are copied both ways
unchanged (TCP mode: the WebSocket upgrade passes through); when either side ends, both are
closed, so a killed node drops its clients' connections as a real balancer would. ``routes``
counts the connections sent to each backend and ``active`` the ones open now.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

_CHUNK = 64 * 1024


class Balancer:
    def __init__(
        self, backends: list[tuple[str, int]], *, port: int = 0, connect_timeout: float = 1.0
    ) -> None:
        if not backends:
            raise ValueError("a balancer needs at least one backend")
        for host, _ in backends:
            if not host.startswith("127."):
                raise ValueError(f"loopback backends only, not {host!r}")
        self.backends = list(backends)
        self.port = port
        self.connect_timeout = connect_timeout
        self.routes: Counter[tuple[str, int]] = Counter()
        self.active: Counter[tuple[str, int]] = Counter()
        self.refused = 0  # backends skipped because they refused or did not answer
        self._next = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._pipes):
            task.cancel()
        for task in list(self._pipes):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Balancer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _dial(self) -> tuple[tuple[str, int], asyncio.StreamReader, asyncio.StreamWriter]:
        """The next backend that accepts, in round-robin order; ConnectionError if none."""
        for _ in range(len(self.backends)):
            backend = self.backends[self._next % len(self.backends)]
            self._next += 1
            try:
                async with asyncio.timeout(self.connect_timeout):
                    reader, writer = await asyncio.open_connection(*backend)
            except (OSError, TimeoutError):
                self.refused += 1
                continue
            return backend, reader, writer
        raise ConnectionError("no backend accepts")

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # A connection handler that ends cancelled makes asyncio log an error (3.11): close()
        # cancels them, so a cancellation ends the handler quietly.
        with contextlib.suppress(asyncio.CancelledError):
            await self._pipe(client_r, client_w)

    async def _pipe(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        self._writers.add(client_w)
        try:
            try:
                backend, server_r, server_w = await self._dial()
            except ConnectionError:
                return
            self._writers.add(server_w)
            self.routes[backend] += 1
            self.active[backend] += 1
            try:
                up = asyncio.create_task(_copy(client_r, server_w))
                down = asyncio.create_task(_copy(server_r, client_w))
                try:
                    await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for t in (up, down):
                        t.cancel()
                    for t in (up, down):
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await t
            finally:
                self.active[backend] -= 1
                self._writers.discard(server_w)
                await _shut(server_w)
        finally:
            self._writers.discard(client_w)
            await _shut(client_w)
            self._pipes.discard(task)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()


async def _shut(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
