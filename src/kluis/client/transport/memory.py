"""An in-memory transport: a client joined to a server application in the same process.

Theory of operation (as httpx's ``ASGITransport`` or h11's ``ConnectionPair``): there is no
socket, but every frame still crosses as encoded bytes through the server's own connection
handler, so the protocol is exercised exactly. The server's half is a :class:`ServerEnd` that
a :class:`ServerLink` hands out (``kluis.server.inprocess`` provides both; this module does not
import the server). The pair behaves as ``server/websocket.py`` does over a socket:

- the ``Challenge`` comes first; requests are handled one at a time, in the order sent;
- within one event-loop turn, replies go before pushes, so a login answers ``Welcome``, then the
  stored backlog one page per turn, then ``Synced``;
- pushes arrive when the server calls the ``wake`` callback it was given;
- a close the server asks for (this device revoked, a newer connection of the same device, a
  failed login) comes after the reply and ends the channel with close code 1008, as a socket
  would; closing the client ends the server's half too.

Not emulated (tests of these keep a real server on loopback): the WebSocket layer's own byte
limits (the 1009 close of a far too large frame, the pre-login byte budget), write-buffer flow
control, the login deadline and heartbeats.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Protocol

from kluis.client.transport.protocol import Push, T, expect_answer, settle_answer
from kluis.errors import KluisError, MalformedFrame, TransportError
from kluis.protocol import frames as f

_POLICY_VIOLATION = 1008  # the close code of a close the server asked for (websocket.py)


class ServerEnd(Protocol):
    """The server's half of one in-memory connection."""

    @property
    def nonce(self) -> bytes: ...

    @property
    def origin(self) -> str:
        """The origin the server names in its challenge."""
        ...

    @property
    def backlog(self) -> bool:
        """Stored envelopes wait: call :meth:`take_outgoing` again on the next turn."""
        ...

    @property
    def close_requested(self) -> bool: ...

    async def handle(self, data: bytes) -> bytes:
        """The encoded answer to one encoded request frame."""
        ...

    def take_outgoing(self) -> list[bytes]:
        """Encoded pushes to deliver now."""
        ...

    def closed(self) -> None:
        """The channel has ended (the server forgets this connection)."""
        ...


class ServerLink(Protocol):
    """A server that in-process clients connect to."""

    def connect(self, wake: Callable[[], None]) -> ServerEnd:
        """A new connection; ``wake`` is called when pushes wait. Raises OSError when down."""
        ...


class MemoryTransport:
    """Implements :class:`kluis.client.transport.protocol.Transport` without a socket."""

    def __init__(self, server: ServerLink, url: str = "") -> None:
        self.url = url  # kept for messages; the server is the one given
        self._server = server
        self._end: ServerEnd | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[f.ServerFrame]] = {}
        self._replies: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._lock = asyncio.Lock()  # the server reads one frame at a time
        self._ended = False
        self.pushes: asyncio.Queue[Push | None] = asyncio.Queue()  # None: connection ended
        self.server_origin = ""
        self.close_code: int | None = None  # set when the server closed the channel

    async def connect(self, timeout: float | None = None) -> bytes:
        """Join the server and return its challenge nonce."""
        if self._end is not None or self._ended:
            raise TransportError("a transport connects once")
        self._loop = asyncio.get_running_loop()
        try:
            end = self._server.connect(self._wake)
        except OSError as exc:
            self._ended = True
            raise TransportError(f"cannot connect to {self.url or 'the server'}: {exc}") from exc
        self._end = end
        challenge = f.decode_server_frame(f.encode(f.Challenge(nonce=end.nonce, server=end.origin)))
        if not isinstance(challenge, f.Challenge):  # pragma: no cover - built just above
            await self.close()
            raise MalformedFrame("server did not start with a challenge")
        self.server_origin = challenge.server
        return challenge.nonce

    async def request(self, make: Callable[[int], f.ClientFrame], expect: type[T]) -> T:
        """Send the frame ``make(rid)`` and return its answer; a server Error is raised typed."""
        end = self._end
        if end is None or self._ended:
            raise TransportError("not connected")
        rid = next(self._rids)
        fut: asyncio.Future[f.ServerFrame] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        data = f.encode(make(rid))
        async with self._lock:
            if not self._ended:
                try:
                    reply = await end.handle(data)
                except Exception as exc:  # the server's handler broke: its socket would drop
                    self._end_channel(TransportError(f"connection lost: {exc}"))
                    raise TransportError(f"connection lost: {exc}") from exc
                if not self._ended:
                    self._replies.append(reply)
                    if end.close_requested:
                        self._flush()  # the reply, then the close (as websocket.py does)
                    else:
                        self._wake()
        return expect_answer(await fut, expect)

    async def close(self) -> None:
        self._end_channel(TransportError("connection closed"))

    # ---- the server's side of the pair ---------------------------------------------------------

    def _wake(self) -> None:
        """Pushes wait, or a close was requested: deliver them on the next turn."""
        if self._flush_handle is None and not self._ended and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        end = self._end
        if end is None or self._ended:
            return
        out, self._replies = self._replies, []
        out.extend(end.take_outgoing())
        if end.backlog:
            self._wake()  # the next page on the next turn
        try:
            for data in out:
                self._receive(f.decode_server_frame(data))
        except KluisError as exc:
            self._end_channel(exc)
            return
        if end.close_requested:
            self._end_channel(
                TransportError(
                    f"connection closed by server ({_POLICY_VIOLATION})",
                    close_code=_POLICY_VIOLATION,
                )
            )

    def _receive(self, frame: f.ServerFrame) -> None:
        if isinstance(frame, f.Deliver | f.KeysLow | f.Synced):
            self.pushes.put_nowait(frame)
            return
        settle_answer(self._waiting, frame)

    def _end_channel(self, error: KluisError) -> None:
        if self._ended:
            return
        self._ended = True
        code = error.details.get("close_code")
        self.close_code = code if isinstance(code, int) else None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._replies = []
        if self._end is not None:
            self._end.closed()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(error)
        self._waiting.clear()
        self.pushes.put_nowait(None)
