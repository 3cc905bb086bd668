"""The loopback balancer of the node tests (tests/loadbalancer.py): round-robin over the
backends that accept, both directions copied, a dead backend's connections dropped."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.kluis_testing import free_port
from tests.loadbalancer import Balancer


class Echo:
    """A backend that answers ``name:data``; :meth:`kill` drops it and its connections."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return "127.0.0.1", int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1024):
                writer.write(self.name + b":" + data)
                await writer.drain()
        self.writers.discard(writer)
        writer.close()

    async def kill(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self.writers):
                writer.close()
            await self.server.wait_closed()
            self.server = None


async def _ask(port: int, text: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(text)
        await writer.drain()
        return await asyncio.wait_for(reader.read(1024), 5)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_round_robin_skips_a_backend_that_refuses_and_drops_with_a_dead_one() -> None:
    a, b = Echo(b"a"), Echo(b"b")
    dead = ("127.0.0.1", free_port())  # nothing listens there
    backends = [await a.start(), dead, await b.start()]
    try:
        async with Balancer(backends) as lb:
            answers = [await _ask(lb.port, b"hi") for _ in range(4)]
            assert answers == [b"a:hi", b"b:hi", b"a:hi", b"b:hi"]
            assert lb.refused == 2 and lb.routes[dead] == 0
            # A backend that goes away takes its clients' connections with it.
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
            writer.write(b"x")
            assert await asyncio.wait_for(reader.read(1024), 5) == b"a:x"
            await a.kill()
            assert await asyncio.wait_for(reader.read(1024), 5) == b""
            writer.close()
            await writer.wait_closed()
            assert await _ask(lb.port, b"again") == b"b:again"  # a refuses now: skipped
    finally:
        await a.kill()
        await b.kill()


def test_only_loopback_backends() -> None:
    with pytest.raises(ValueError, match="loopback"):
        Balancer([("10.0.0.1", 80)])
