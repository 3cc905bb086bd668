"""A client kept connected: reconnects with back-off and jitter, to the balancer or another node.

Theory of operation: :class:`ReconnectingSession` runs a :class:`KluisClient`. It follows
``events()``, and when the stream ends with ``ConnectionDown`` (or a login fails) it waits as
its :class:`~kluis.client.backoff.Backoff` says and connects again, to the profile's URL (a load
balancer) or to the next of its :class:`~kluis.client.backoff.Endpoints`; ``connect()`` then
re-syncs (the server sends the stored backlog; the outbox goes first). A close with 1001 (the
node is draining) brings the next attempt at once; a node that hangs without closing is
noticed by the WebSocket heartbeat (no pong within half the interval ends the channel). :meth:`ReconnectingSession.call` runs an
operation once connected; an operation whose connection failed closes it, so the session
notices at once even when the server went silent.

Errors: a :class:`~kluis.errors.TransportError` or a refusal from the server (a remote protocol
error) is retried; a wiped device, a local error and anything else ends :meth:`run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random as _random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from kluis.client.backoff import GOING_AWAY, Backoff, BackoffPolicy, Endpoints
from kluis.client.events import ConnectionDown, ConnectionUp, Event
from kluis.errors import DeviceWiped, LocalProtocolError, RemoteProtocolError, TransportError

if TYPE_CHECKING:
    from kluis.client.client import KluisClient
    from kluis.client.transport import Transport, TransportFactory

T = TypeVar("T")


class ReconnectingSession:
    """A :class:`KluisClient` kept connected (see the module's docstring).

    ``on_event`` gets every event of ``events()``, ``ConnectionUp`` and ``ConnectionDown``
    included. Without a ``transport_factory`` it dials WebSockets that ping every
    ``heartbeat_s`` seconds, so that a node that hangs without closing (stopped, cut off) is left
    within that time. ``outages`` collects, per reconnection, the seconds from the drop to the next
    login (by ``clock``)."""

    def __init__(
        self,
        client: KluisClient,
        policy: BackoffPolicy | None = None,
        *,
        endpoints: Sequence[str] = (),
        transport_factory: TransportFactory | None = None,
        heartbeat_s: float | None = 20.0,
        on_event: Callable[[Event], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        rand = random or _random.SystemRandom().random
        self.client = client
        self.backoff = Backoff(policy or BackoffPolicy(), clock=clock, random=rand)
        self.endpoints = Endpoints(endpoints, rand) if endpoints else None
        self._factory, self._on_event = transport_factory, on_event
        self._heartbeat = heartbeat_s
        self._clock, self._sleep = clock, sleep
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.connections = 0  # logins so far (the first one included)
        self.downs: list[ConnectionDown] = []
        self.outages: list[float] = []
        self._down_since: float | None = None

    @property
    def connected(self) -> bool:
        return self._up.is_set() and self.client.connected

    @property
    def url(self) -> str:
        """Where the next (or the current) connection goes."""
        return self.endpoints.current if self.endpoints else self.client.core.server

    def _dial(self, _server: str) -> Transport:
        if self._factory is None:
            from kluis.client.transport import WebSocketTransport  # aiohttp, on first use

            return WebSocketTransport(self.url, heartbeat=self._heartbeat)
        return self._factory(self.url)

    # ---- running ------------------------------------------------------------------------------

    def start(self) -> None:
        """Run :meth:`run` in a task (stop it with :meth:`stop`)."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="kluis-reconnect")

    async def stop(self) -> None:
        """Stop reconnecting; the client stays open (close it yourself). Re-raises what ended
        :meth:`run`, if anything did."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def run(self) -> None:
        """Connect and stay connected, until cancelled or an error that retrying cannot mend."""
        while True:
            down = await self._session()
            self._up.clear()
            self.downs.append(down)
            self._emit(down)
            if self._down_since is None:
                self._down_since = self._clock()
            going_away = down.close_code == GOING_AWAY
            wait = self.backoff.down(going_away=going_away)
            if self.endpoints is not None:
                self.endpoints.advance()
            await self._sleep(wait)

    async def _session(self) -> ConnectionDown:
        """One connection, from the login to its end."""
        try:
            await self.client.connect(transport_factory=self._dial)
        except DeviceWiped:
            raise
        except (TransportError, RemoteProtocolError) as exc:
            return ConnectionDown(str(exc))
        try:
            async for event in self.client.events():
                if isinstance(event, ConnectionDown):
                    return event
                if isinstance(event, ConnectionUp):
                    self._logged_in()
                self._emit(event)
        except DeviceWiped:
            raise
        except (TransportError, RemoteProtocolError) as exc:
            await self.client.disconnect()
            return ConnectionDown(str(exc))
        except LocalProtocolError as exc:
            if self.client.connected:
                raise
            return ConnectionDown(str(exc))  # call() dropped the connection under the stream
        return ConnectionDown("the event stream ended")  # pragma: no cover - it ends on a down

    def _logged_in(self) -> None:
        self.connections += 1
        self.backoff.up()
        if self._down_since is not None:
            self.outages.append(self._clock() - self._down_since)
            self._down_since = None
        self._up.set()

    def _emit(self, event: Event) -> None:
        if self._on_event is not None:
            self._on_event(event)

    async def _drop(self) -> None:
        """Close the connection: the event stream then ends with ConnectionDown."""
        with contextlib.suppress(Exception):
            await self.client.disconnect()

    # ---- operations ---------------------------------------------------------------------------

    async def wait_connected(self, timeout: float) -> None:
        """Return once logged in; TransportError after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while not self.connected:
                    await self._up.wait()
                    if not self.client.connected:  # set, but the stream is ending: next turn
                        await asyncio.sleep(0.01)
        except TimeoutError as exc:
            raise TransportError(f"not connected within {timeout:g} s") from exc

    async def call(self, op: Callable[[KluisClient], Awaitable[T]], *, timeout: float = 30.0) -> T:
        """Run ``op(client)`` once connected (waiting at most ``timeout`` for it). A connection
        that fails under it is closed, so the session reconnects at once, and the error goes to
        the caller: ``send`` raises NotSent, its text kept in the outbox for the next login.
        ``op`` runs once; whether to try again is the caller's choice."""
        await self.wait_connected(timeout)
        try:
            return await op(self.client)
        except TransportError as exc:
            if exc.details.get("close_code") is None:
                # Lost without a word (a timeout, a reset): close it so the event stream
                # ends now. A server's close the stream sees itself, with its code.
                await self._drop()
            raise
        except LocalProtocolError as exc:
            if self.client.connected or "not connected" not in exc.message:
                raise
            # The connection went away under the operation, between two of its requests:
            # a transport failure too. Not run again here: a part may have gone (a send
            # committed, then its receipts failed), and a second run would send it twice.
            raise TransportError("the connection went away during the operation") from exc
