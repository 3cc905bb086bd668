"""The delivery bus across nodes: Redis pub/sub (redis-py asyncio).

Theory of operation: every node of a deployment subscribes to one channel,
``<prefix>:signals``, and keeps its own live connections in a dictionary, as ``InProcessBus``
does. A signal for a device goes to the local subscriber at once (with the envelope body as a
hint) and is also published on the channel, tagged with this node's random ID; every other node
hands it to its own subscriber for that device, if it has one. A subscription is published too,
so the node holding an older connection of the device displaces it (the newest connection wins
across nodes).

What crosses Redis is small and says nothing about content: a signal kind, a node ID, a device
ID and a number (a sequence number or a key count). Never an envelope body: receiving nodes get
``envelope(seq, None)`` and read the envelope from the shared store.

Redis holds nothing that must survive. Signals are fire-and-forget: the bus methods never block
and never fail the caller; publishing runs in a background task through a bounded queue, and
the listener reconnects with back-off when Redis goes away. A signal lost meanwhile (Redis down,
queue full) costs latency, not messages: the store is the truth, a connection re-reads its
mailbox at login and whenever an announcement is out of step, and a device that missed its
signal gets its envelopes with the next one or at its next login.

Errors are bounded and typed: ``start`` raises ``RedisBusError`` when Redis does not answer
within ``connect_timeout_s``; every later Redis failure is logged (at most once per
back-off step) and retried, never raised into a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from kluis.server.delivery.protocol import Subscriber

log = logging.getLogger("kluis.server.delivery.redis")

# Signal kinds on the channel (one word each): "<kind> <node> <number> <device>".
ENVELOPE, KEYS_LOW, SUBSCRIBED, REVOKED = "env", "keys", "sub", "rev"
_KINDS = frozenset((ENVELOPE, KEYS_LOW, SUBSCRIBED, REVOKED))
_MAX_SIGNAL_BYTES = 1024  # a device ID is far shorter; anything longer is not ours


class RedisBusError(Exception):
    """Redis could not be reached (at start-up) or the bus is used in a wrong state."""


def is_redis_url(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "unix://"))


class RedisBus:
    """The DeliveryBus over Redis pub/sub; ``start`` before use, ``close`` at shutdown."""

    def __init__(
        self,
        url: str,
        prefix: str = "kluis",
        *,
        queue_size: int = 10_000,
        connect_timeout_s: float = 5.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        if not is_redis_url(url):
            raise RedisBusError("--redis takes a redis://HOST:PORT/DB URL")
        if not prefix or any(c.isspace() for c in prefix):
            raise RedisBusError("the Redis channel prefix must be a non-empty word")
        self.url = url
        self.channel = f"{prefix}:signals"
        self.node = secrets.token_hex(8)
        self._subscribers: dict[str, Subscriber] = {}
        self._queue: asyncio.Queue[str] | None = None
        self._queue_size = queue_size
        self._connect_timeout_s = connect_timeout_s
        self._max_backoff_s = max_backoff_s
        self._redis: aioredis.Redis | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._listening = asyncio.Event()
        self.dropped = 0  # signals not published (queue full or Redis down): latency only

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._redis is not None

    async def start(self) -> None:
        """Connect, subscribe and start the background tasks; idempotent.

        Raises RedisBusError when Redis does not answer within the connect timeout."""
        if self._redis is not None:
            return
        client = self._client()
        try:
            await asyncio.wait_for(client.ping(), self._connect_timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            await client.aclose()
            raise RedisBusError(f"Redis does not answer at {self._safe_url()}: {exc}") from exc
        self._redis = client
        self._queue = asyncio.Queue(self._queue_size)
        self._listening.clear()
        self._tasks = [
            asyncio.create_task(self._listen(), name="redis-bus-listen"),
            asyncio.create_task(self._publish(), name="redis-bus-publish"),
        ]
        try:
            await asyncio.wait_for(self._listening.wait(), self._connect_timeout_s)
        except TimeoutError as exc:
            await self.close()
            raise RedisBusError(f"cannot subscribe at {self._safe_url()}") from exc

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        self._queue = None

    async def ping(self) -> None:
        """One PING on the bus's client (the readiness check, server/health.py)."""
        if self._redis is None:
            raise RedisBusError("the Redis bus is not started")
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            raise RedisBusError(f"Redis does not answer at {self._safe_url()}") from exc

    # -- DeliveryBus --------------------------------------------------------------------------

    def subscribe(self, device_id: str, subscriber: Subscriber) -> None:
        old = self._subscribers.get(device_id)
        self._subscribers[device_id] = subscriber
        if old is not None and old is not subscriber:
            old.displaced()
        self._send(SUBSCRIBED, 0, device_id)

    def unsubscribe(self, device_id: str, subscriber: Subscriber) -> None:
        if self._subscribers.get(device_id) is subscriber:
            del self._subscribers[device_id]

    def announce(self, device_id: str, seq: int, body: bytes | None = None) -> None:
        subscriber = self._subscribers.get(device_id)
        if subscriber is not None:
            subscriber.envelope(seq, body)
        # Published even so: during a move between nodes, the device's newest connection may be
        # elsewhere while this node still holds the older one.
        self._send(ENVELOPE, seq, device_id)

    def keys_low(self, device_id: str, count: int) -> None:
        subscriber = self._subscribers.get(device_id)
        if subscriber is not None:
            subscriber.keys_low(count)
        self._send(KEYS_LOW, count, device_id)

    def revoke(self, device_id: str) -> None:
        subscriber = self._subscribers.get(device_id)
        if subscriber is not None:
            subscriber.revoked()
        self._send(REVOKED, 0, device_id)

    # -- internals ----------------------------------------------------------------------------

    def _client(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=self._connect_timeout_s,
            socket_timeout=self._connect_timeout_s,
            health_check_interval=10,
            decode_responses=False,
            client_name=f"kluis-bus-{self.node}",
        )

    def _safe_url(self) -> str:
        """The URL without a password, for messages."""
        scheme, sep, rest = self.url.partition("://")
        return f"{scheme}{sep}{rest.rpartition('@')[2]}"

    def _send(self, kind: str, number: int, device_id: str) -> None:
        if self._queue is None:
            self.dropped += 1  # not started (or closed): local delivery only
            return
        try:
            self._queue.put_nowait(f"{kind} {self.node} {number} {device_id}")
        except asyncio.QueueFull:
            self.dropped += 1

    def _receive(self, data: Any) -> None:
        """One message from the channel; anything malformed is ignored."""
        if not isinstance(data, bytes) or len(data) > _MAX_SIGNAL_BYTES:
            return
        try:
            kind, node, number_text, device_id = data.decode().split(" ", 3)
            number = int(number_text)
        except ValueError:  # UnicodeDecodeError included
            return
        if node == self.node or kind not in _KINDS:
            return
        subscriber = self._subscribers.get(device_id)
        if subscriber is None:
            return
        if kind == ENVELOPE:
            subscriber.envelope(number, None)
        elif kind == KEYS_LOW:
            subscriber.keys_low(number)
        elif kind == SUBSCRIBED:  # a newer connection on another node
            del self._subscribers[device_id]
            subscriber.displaced()
        else:
            del self._subscribers[device_id]
            subscriber.revoked()

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            client = self._redis
            assert client is not None
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._listening.set()
                if backoff > 0.1:
                    log.info("redis bus subscribed again")
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._receive(message.get("data"))
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("redis bus lost its subscription (%s); retrying in %.1fs", exc, backoff)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)

    async def _publish(self) -> None:
        queue, client = self._queue, self._redis
        assert queue is not None and client is not None
        backoff = 0.1
        while True:
            batch = [await queue.get()]
            while not queue.empty() and len(batch) < 512:
                batch.append(queue.get_nowait())
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for signal in batch:
                        pipe.publish(self.channel, signal)
                    await pipe.execute()
                backoff = 0.1
            except (RedisError, OSError, TimeoutError) as exc:
                self.dropped += len(batch)
                log.warning("redis bus dropped %d signals (%s)", len(batch), exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
