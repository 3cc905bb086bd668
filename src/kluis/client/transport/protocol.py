"""What the client needs from a transport: one authenticated channel of frames to one server.

Theory of operation: :meth:`Transport.connect` opens the channel and returns the server's
challenge nonce (and sets :attr:`Transport.server_origin` from the same ``Challenge``).
:meth:`Transport.request` sends one request frame, built with a fresh ``rid``, and returns the
answer with that ``rid``; a server ``Error`` is raised as its typed :mod:`kluis.errors` class.
Everything the server sends unasked (``Deliver``, ``KeysLow``, ``Synced``) goes, in order, into
:attr:`Transport.pushes`; ``None`` there means the channel has ended. Every failure of the
channel itself is a :class:`kluis.errors.TransportError`.

Implementations: :mod:`.websocket` (the ``websockets`` library, the real thing) and :mod:`.memory` (a server
application in the same process, for tests and embedding). Both carry encoded frames as bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol, TypeVar

from kluis.errors import MalformedFrame, MismatchedDevices, error_for_code
from kluis.protocol import frames as f

T = TypeVar("T", bound=f.ServerFrame)
Push = f.Deliver | f.KeysLow | f.Synced


class Transport(Protocol):
    """One channel of frames between this client and a server."""

    @property
    def server_origin(self) -> str:
        """The origin the server named in its challenge (empty before :meth:`connect`)."""
        ...

    @property
    def pushes(self) -> asyncio.Queue[Push | None]:
        """Frames the server sent unasked, in order; ``None`` once the channel has ended."""
        ...

    @property
    def close_code(self) -> int | None:
        """Why the channel ended: the WebSocket close code the server sent (1001: the node is
        going away, reconnect at once), else None (still open, or lost without a word)."""
        ...

    async def connect(self, timeout: float | None = None) -> bytes:
        """Open the channel; return the server's challenge nonce."""
        ...

    async def request(self, make: Callable[[int], f.ClientFrame], expect: type[T]) -> T:
        """Send ``make(rid)`` and return its answer; a server Error is raised typed."""
        ...

    async def close(self) -> None:
        """End the channel (idempotent); waiting requests fail with TransportError."""
        ...


def settle_answer(waiting: dict[int, asyncio.Future[f.ServerFrame]], frame: f.ServerFrame) -> None:
    """Hand an answer to the request waiting for its ``rid``. A refusal of a frame the server
    could not read (too large, undecodable) names no request: it answers every one waiting,
    so none waits for an answer that will never come."""
    rid = getattr(frame, "rid", None)
    if rid is None:
        if not isinstance(frame, f.Error):
            return
        futures = list(waiting.values())
        waiting.clear()
    else:
        fut = waiting.pop(rid, None)
        futures = [] if fut is None else [fut]
    for fut in futures:
        if not fut.done():
            fut.set_result(frame)


def expect_answer(answer: f.ServerFrame, expect: type[T]) -> T:
    """The answer to a request, as ``expect``: a server Error raised as its typed class, any
    other frame a MalformedFrame. Every transport's :meth:`Transport.request` ends here."""
    if isinstance(answer, f.Error):
        error = error_for_code(answer.code, answer.message)
        if isinstance(error, MismatchedDevices):
            error.mismatched = [(m.account, m.missing, m.extra) for m in answer.mismatched]
        raise error
    if not isinstance(answer, expect):
        raise MalformedFrame(f"expected {expect.__name__}, got {type(answer).__name__}")
    return answer


TransportFactory = Callable[[str], Transport]
"""Makes a transport to the server at a URL (``KluisClient`` takes one; tests inject theirs)."""
