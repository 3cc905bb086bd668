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

Device lists: a change to an account's devices is published as a ``dev`` signal naming the
account; every other node drops its cached copy (``Accounts.invalidate``). Sends do not rely on
that signal alone: they check a version in Redis (``server/redis_state.py``).

Presence: a key ``<prefix>:on:<device>`` names the node holding the device's live connection.
It is set at subscription, refreshed every ``presence_refresh_s`` (one pipeline per node, only
while it still names this node), lives ``presence_ttl_s`` and is deleted (if it still names this
node) when the connection ends: the devices of a node that died stop being online within the
TTL. Presence also backs up the newest-connection-wins rule: a refresh that finds a device's
key naming another node (its ``sub`` signal was lost) displaces the local connection. A new
subscription's key is claimed (set whoever it names) until its own SET is seen to land, so a
refresh never yields a newer connection's key to an older one. Each node also writes its count of live connections, with a deadline, into the hash
``<prefix>:nodes``; ``online_devices`` sums the live entries (for metrics; never per device).

Errors are bounded and typed: ``start`` raises ``RedisBusError`` when Redis does not answer
within ``connect_timeout_s``; every later Redis failure is logged (at most once per
back-off step) and retried, never raised into a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from kluis.server.delivery.protocol import Subscriber

log = logging.getLogger("kluis.server.delivery.redis")

# Signal kinds on the channel (one word each): "<kind> <node> <number> <device>"; a DEVICES
# signal names an account instead of a device.
ENVELOPE, KEYS_LOW, SUBSCRIBED, REVOKED, DEVICES = "env", "keys", "sub", "rev", "dev"
_KINDS = frozenset((ENVELOPE, KEYS_LOW, SUBSCRIBED, REVOKED, DEVICES))
_MAX_SIGNAL_BYTES = 1024  # a device ID is far shorter; anything longer is not ours
_PRESENCE_CHUNK = 1_000  # presence keys per refresh call

# KEYS: presence keys. ARGV: node, TTL (s), one flag per key: "c" claim (a subscription whose
# own SET is not known to have landed), "r" refresh. A refresh keeps a key that is missing or
# names this node; one naming another node belongs to the device's newer connection there.
# Answers one character per key: "1" set, "0" held by another node.
_REFRESH = """
local out = {}
for i, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  if string.sub(ARGV[3], i, i) == 'c' or not owner or owner == ARGV[1] then
    redis.call('SET', key, ARGV[1], 'EX', ARGV[2])
    out[i] = '1'
  else
    out[i] = '0'
  end
end
return table.concat(out)
"""
# KEYS: presence keys. ARGV: node. Delete each key that names this node.
_RELEASE = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0
"""
# KEYS[1]: the nodes hash. ARGV: node, count, TTL (ms). Count and deadline of this node.
_NODE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. (now + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 0
"""
# KEYS[1]: the nodes hash. The sum of live nodes' counts; entries past their deadline go.
_ONLINE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local all = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #all, 2 do
  local count, deadline = string.match(all[i + 1], '^(%d+) (%d+)$')
  if count and tonumber(deadline) > now then
    total = total + tonumber(count)
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return total
"""


async def _bounded(step: Awaitable[object], timeout: float) -> None:
    """Run ``step`` for at most ``timeout`` seconds; its failure is logged, never raised, and a
    step that does not end (even when cancelled) is left behind, not awaited."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait([task], timeout=timeout)
    if not done:
        task.cancel()
        log.warning("redis bus: a step of its shutdown did not end in %.1fs", timeout)
    elif task.exception() is not None:
        log.warning("redis bus: shutdown step failed (%s)", type(task.exception()).__name__)


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
        presence_ttl_s: float = 60.0,
        presence_refresh_s: float = 20.0,
    ) -> None:
        if not is_redis_url(url):
            raise RedisBusError("--redis takes a redis://HOST:PORT/DB URL")
        if not prefix or any(c.isspace() for c in prefix):
            raise RedisBusError("the Redis channel prefix must be a non-empty word")
        self.url = url
        self.channel = f"{prefix}:signals"
        self.prefix = prefix
        self._on_prefix = f"{prefix}:on:"
        self.node = secrets.token_hex(8)
        self._subscribers: dict[str, Subscriber] = {}
        # Local subscriptions whose presence SET has not been seen to land: a refresh claims
        # their keys instead of yielding them to another node.
        self._unclaimed: set[str] = set()
        self._queue: asyncio.Queue[tuple[Any, ...]] | None = None
        # Whole seconds for SET EX; the refresh comes well before the key expires.
        self._presence_ttl_s = max(1, round(presence_ttl_s))
        self._presence_refresh_s = max(0.05, min(presence_refresh_s, self._presence_ttl_s / 2))
        self.on_devices_changed: Callable[[str], None] | None = None  # Accounts.invalidate
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
            asyncio.create_task(self._refresh_presence(), name="redis-bus-presence"),
        ]
        try:
            await asyncio.wait_for(self._listening.wait(), self._connect_timeout_s)
        except TimeoutError as exc:
            await self.close()
            raise RedisBusError(f"cannot subscribe at {self._safe_url()}") from exc

    async def close(self) -> None:
        """Stop the background tasks, release this node's presence keys (a clean stop: its
        devices go offline at once) and close the client; bounded by the connect timeout at
        each step, whatever Redis or a task does (a close must never hang a node's shutdown)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self._connect_timeout_s)
        self._tasks = []
        client, self._redis, self._queue = self._redis, None, None
        if client is not None:
            self._redis = client  # _release_all reads it
            await _bounded(self._release_all(), self._connect_timeout_s)
            self._redis = None
            await _bounded(client.aclose(), self._connect_timeout_s)

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
        self._unclaimed.add(device_id)
        if old is not None and old is not subscriber:
            old.displaced()
        self._send(SUBSCRIBED, 0, device_id)
        self._command("SET", self._presence_key(device_id), self.node, "EX", self._presence_ttl_s)

    def unsubscribe(self, device_id: str, subscriber: Subscriber) -> None:
        if self._subscribers.get(device_id) is subscriber:
            del self._subscribers[device_id]
            self._unclaimed.discard(device_id)
            self._command("EVAL", _RELEASE, 1, self._presence_key(device_id), self.node)

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

    def devices_changed(self, account_id: str) -> None:
        """The account's devices changed: the other nodes drop their cached list."""
        self._send(DEVICES, 0, account_id)

    # -- presence -----------------------------------------------------------------------------

    @property
    def local_devices(self) -> int:
        """Devices with a live connection on this node."""
        return len(self._subscribers)

    async def online_devices(self) -> int:
        """Devices with a live connection on any live node (a node's count lapses with it)."""
        if self._redis is None:
            raise RedisBusError("the bus is not started")
        return int(await self._redis.eval(_ONLINE, 1, f"{self.prefix}:nodes"))

    async def owner(self, device_id: str) -> str | None:
        """The node that holds the device's live connection, per its presence key."""
        if self._redis is None:
            raise RedisBusError("the bus is not started")
        value = await self._redis.get(self._presence_key(device_id))
        return value.decode() if isinstance(value, bytes) else None

    def _presence_key(self, device_id: str) -> str:
        return self._on_prefix + device_id

    async def _refresh_presence(self) -> None:
        client = self._redis
        assert client is not None
        backoff = self._presence_refresh_s
        while True:
            try:
                await self._write_presence(client)
                wait = backoff = self._presence_refresh_s
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("redis bus could not refresh presence (%s)", type(exc).__name__)
                wait = backoff
                backoff = min(backoff * 2, self._max_backoff_s)
            await asyncio.sleep(wait)

    async def _write_presence(self, client: aioredis.Redis) -> None:
        """Refresh this node's presence keys and count; displace the connections whose key
        names another node (the device's newer connection there, its ``sub`` signal lost)."""
        devices = list(self._subscribers.items())
        keys = [self._presence_key(d) for d, _ in devices]
        flags = "".join(["c" if d in self._unclaimed else "r" for d, _ in devices])
        ttl_ms = int(self._presence_ttl_s * 1000)
        async with client.pipeline(transaction=False) as pipe:
            for i in range(0, len(keys), _PRESENCE_CHUNK):
                chunk, chunk_flags = keys[i : i + _PRESENCE_CHUNK], flags[i : i + _PRESENCE_CHUNK]
                pipe.eval(
                    _REFRESH, len(chunk), *chunk, self.node, self._presence_ttl_s, chunk_flags
                )
            pipe.eval(_NODE, 1, f"{self.prefix}:nodes", self.node, len(keys), ttl_ms)
            answers = await pipe.execute()
        held = b"".join(answers[:-1])
        for (device_id, subscriber), flag, mine in zip(devices, flags, held, strict=True):
            if flag == "c":
                self._unclaimed.discard(device_id)
            elif mine == 48 and self._subscribers.get(device_id) is subscriber:  # b"0"
                del self._subscribers[device_id]
                subscriber.displaced()

    async def _release_all(self) -> None:
        client = self._redis
        assert client is not None
        keys = [self._presence_key(d) for d in self._subscribers]
        async with client.pipeline(transaction=False) as pipe:
            for i in range(0, len(keys), _PRESENCE_CHUNK):
                chunk = keys[i : i + _PRESENCE_CHUNK]
                pipe.eval(_RELEASE, len(chunk), *chunk, self.node)
            pipe.hdel(f"{self.prefix}:nodes", self.node)
            await pipe.execute()

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
        self._command("PUBLISH", self.channel, f"{kind} {self.node} {number} {device_id}")

    def _command(self, *command: Any) -> None:
        """Queue one command for the publishing task (signals, presence): never blocks."""
        if self._queue is None:
            self.dropped += 1  # not started (or closed): local delivery only
            return
        try:
            self._queue.put_nowait(command)
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
        if kind == DEVICES:  # names an account
            if self.on_devices_changed is not None:
                self.on_devices_changed(device_id)
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
            self._unclaimed.discard(device_id)
            subscriber.displaced()
        else:
            del self._subscribers[device_id]
            self._unclaimed.discard(device_id)
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
                    for command in batch:
                        pipe.execute_command(*command)
                    await pipe.execute()
                for command in batch:
                    if command[0] == "SET":  # a subscription's presence key landed
                        self._unclaimed.discard(command[1].removeprefix(self._on_prefix))
                backoff = 0.1
            except (RedisError, OSError, TimeoutError) as exc:
                self.dropped += len(batch)
                log.warning("redis bus dropped %d signals (%s)", len(batch), exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
