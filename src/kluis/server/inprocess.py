"""The server application in the same process as its clients, with no socket.

The one adapter between the server and the client's ``MemoryTransport``: neither imports the
other; the transport needs only a ``connect(wake)`` that returns a ``ServerEnd``. When
the server's internals change, only this module follows. Each connection is the server's real
:class:`~kluis.server.connection.Connection`, fed encoded frames, as ``server/websocket.py``
feeds it from a socket.

    server = await open_inprocess_server(ServerConfig(data_dir=tmp))
    client = await KluisClient.register(server.url, (await server.create_licences(1))[0], profile,
                                        passphrase, transport_factory=partial(MemoryTransport, server))
    ...
    await server.close()

Not run here: the sweeper and the checkpointer of ``app.py`` (tests call the store if needed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from kluis.server.app import Server, open_server
from kluis.server.config import ServerConfig
from kluis.server.connection import Connection


class InProcessEnd:
    """The server's half of one in-memory connection (a ``ServerEnd``)."""

    __slots__ = ("_conn", "_server")

    def __init__(self, server: InProcessServer, conn: Connection) -> None:
        self._server, self._conn = server, conn

    @property
    def nonce(self) -> bytes:
        return self._conn.nonce

    @property
    def origin(self) -> str:
        return self._server.origin

    @property
    def backlog(self) -> bool:
        """Call :meth:`take_outgoing` again next turn: a page waits and no read is in flight
        (a read in flight wakes the transport itself when it is done)."""
        return self._conn.backlog and not self._conn.reading

    @property
    def close_requested(self) -> bool:
        return self._conn.close_requested

    async def handle(self, data: bytes) -> bytes:
        return await self._conn.handle(data)

    def take_outgoing(self) -> list[bytes]:
        return self._conn.take_outgoing()

    def closed(self) -> None:
        self._server._ends.discard(self)
        self._conn.closed()

    def shut_down(self) -> None:
        self._conn.close_reason = b"server shutting down"
        self._conn.revoked()  # asks for a close and wakes the transport


class InProcessServer:
    """A server application that in-process clients join (a ``ServerLink``)."""

    def __init__(self, server: Server, url: str) -> None:
        self.server = server
        self.url = url
        self._ends: set[InProcessEnd] = set()
        self._open = True

    @property
    def origin(self) -> str:
        return self.server.services.origin

    @property
    def config(self) -> ServerConfig:
        return self.server.config

    def connect(self, wake: Callable[[], None]) -> InProcessEnd:
        if not self._open:
            raise ConnectionRefusedError("the in-process server is closed")
        end = InProcessEnd(self, Connection(self.server.services, wake))
        self._ends.add(end)
        return end

    async def create_licences(self, count: int = 1, days: int = 182) -> list[str]:
        """What ``kluis licence create`` does."""
        return await self.server.services.accounts.create_licences(count, days)

    async def close(self) -> None:
        """Close every connection (clients see a close, code 1008), then the store."""
        if not self._open:
            return
        self._open = False
        for end in list(self._ends):
            end.shut_down()
        await asyncio.sleep(0)  # their transports deliver the close
        for end in list(self._ends):
            end.closed()
        await self.server.store.close()


async def open_inprocess_server(
    config: ServerConfig, clock: Callable[[], float] = time.time
) -> InProcessServer:
    """Open the server's state from ``config`` and serve it in this process.

    Clients dial :attr:`InProcessServer.url`, the URL whose origin the server names.
    """
    return InProcessServer(
        open_server(config, clock), config.public_url or f"http://{config.host}:{config.port}"
    )
