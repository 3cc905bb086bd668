"""State the nodes of a deployment share in Redis: rate-limit buckets, mailbox counters and
device-list versions.

Theory of operation: every operation is queued and the queue is flushed by one task, one
pipeline per batch (like the mailbox's group commit): at most one Lua call for all queued
bucket takes, one for all device-list versions asked, and one for all mailbox counter
increments. Arguments and answers are packed into one string each where they can be:
one argument or answer per item cost the node more CPU than Redis spent. Callers get an ``asyncio.Future`` at once, so a request that needs several
answers queues them all before its first await and pays one round trip.

- **Buckets** (``<prefix>:rl:<kind>:<key>``, a hash of tokens and a timestamp): the token bucket
  of ``ratelimit.TokenBucket``, refilled in the script from Redis's own clock (``TIME``), so
  nodes with skewed clocks share one bucket. ``PEXPIRE`` is the time to refill: a key that
  would be a full bucket is gone, and Redis holds only keys active lately.
- **Mailbox counters** (``<prefix>:mq:<device>``, stored envelopes and bytes): upper bounds,
  raised by every node's deposits and set to the store's exact count by the node that finds
  them at the quota (``server/mailbox.py``). They expire one envelope lifetime after the last
  deposit, when every envelope they counted has expired too; a new counter is raised by the
  store's count at its first use.
- **Device-list versions** (``<prefix>:dv:<account>``): a random token set after every change
  to an account's devices. A node caches a device list with the token it read before reading
  the list, and uses it only while the token is still current (``server/accounts.py``).

Nothing here names a sender and a recipient together, holds content or holds a key.

Redis restarted (empty): the scripts are loaded again at the first ``NOSCRIPT``; the buckets
start full; a counter that did not exist is reported as new, and the mailbox adds the store's
count to it before trusting it (so a lost counter never lets a mailbox pass its quota).

Redis unavailable: every operation answers ``None`` (the caller falls back to its per-node
state, see the callers) and the node stops asking for a back-off period that doubles up to
``max_backoff_s``; one log line per back-off step, naming the exception type only. A node
thus fails open to its local limits rather than refusing service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from kluis.server.batching import GroupCommit

log = logging.getLogger("kluis.server.redis_state")

# KEYS: bucket keys. ARGV[1]: per key, "cost rate burst " (rate per second). Answers a string of
# one character per key: "1" taken, "0" not. (Arguments and answer packed in one string each:
# one argument per key cost the node more than the Redis call.)
_TAKE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local out = {}
local i = 0
for cost, rate, burst in string.gmatch(ARGV[1], '(%S+) (%S+) (%S+)') do
  i = i + 1
  local key = KEYS[i]
  cost, rate, burst = tonumber(cost), tonumber(rate), tonumber(burst)
  local state = redis.call('HMGET', key, 't', 's')
  local tokens = tonumber(state[1]) or burst
  local stamp = tonumber(state[2]) or now
  if now > stamp then tokens = math.min(burst, tokens + (now - stamp) * rate / 1000) end
  if tokens >= cost then
    tokens = tokens - cost
    out[i] = '1'
  else
    out[i] = '0'
  end
  redis.call('HSET', key, 't', tostring(tokens), 's', now)
  local refill = 1000
  if rate > 0 then refill = math.ceil((burst - tokens) * 1000 / rate) + 1000 end
  redis.call('PEXPIRE', key, math.max(1000, refill))
end
return table.concat(out)
"""

# KEYS: counter keys. ARGV[1]: time to live (ms); ARGV[2]: per key, the bytes added, separated
# by spaces. One envelope per key and call. Answers "count bytes new" per key after the
# increment, new = 1 if the key did not exist (expired, evicted, or Redis restarted).
_COUNT = """
local out = {}
local i = 0
for size in string.gmatch(ARGV[2], '%S+') do
  i = i + 1
  local key = KEYS[i]
  local new = 1 - redis.call('EXISTS', key)
  local n = redis.call('HINCRBY', key, 'n', 1)
  out[i] = n .. ' ' .. redis.call('HINCRBY', key, 'b', size) .. ' ' .. new
  redis.call('PEXPIRE', key, ARGV[1])
end
return table.concat(out, ' ')
"""

# KEYS: device-list version keys. Answers the versions separated by spaces, "-" for none.
_VERSIONS = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('GET', key) or '-' end
return table.concat(out, ' ')
"""

_Take = tuple[str, float, float, int, "asyncio.Future[bool | None]"]
_Versions = tuple[list[str], "asyncio.Future[list[str | None] | None]"]
Bounds = list[tuple[int, int, bool]]  # per device: envelopes, bytes, counter just created
_Count = tuple[list[tuple[str, int]], "asyncio.Future[Bounds | None]"]


class RedisStateError(Exception):
    """Redis did not answer at start-up."""


class RedisState:
    """Shared buckets, mailbox counters and device-list versions; ``start`` before use."""

    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        counter_ttl_s: float,
        version_ttl_s: float = 86_400.0,
        connect_timeout_s: float = 5.0,
        op_timeout_s: float = 1.0,
        max_backoff_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url, self.prefix = url, prefix
        self._counter_ttl_ms = int(counter_ttl_s * 1000)
        self._version_ttl_ms = int(version_ttl_s * 1000)
        self._connect_timeout_s, self._op_timeout_s = connect_timeout_s, op_timeout_s
        self._max_backoff_s = max_backoff_s
        self._clock = clock
        self._redis: aioredis.Redis | None = None
        self._take_sha = self._count_sha = self._versions_sha = ""
        self._takes: list[_Take] = []
        self._versions: list[_Versions] = []
        self._counts: list[_Count] = []
        self._batch = GroupCommit(
            self._flush_queued, lambda: bool(self._takes or self._versions or self._counts)
        )
        self._down_until = float("-inf")  # no Redis call before this (back-off)
        self._backoff = 0.0
        self.failures = 0  # batches answered None because Redis failed

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and load the scripts; RedisStateError when Redis does not answer."""
        if self._redis is not None:
            return
        client = aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=self._connect_timeout_s,
            socket_timeout=self._op_timeout_s,
            decode_responses=False,
            client_name="kluis-state",
        )
        try:
            await asyncio.wait_for(self._load_scripts(client), self._connect_timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            await client.aclose()
            raise RedisStateError(f"Redis does not answer: {type(exc).__name__}") from exc
        self._redis = client

    async def close(self) -> None:
        if self._batch.running is not None:
            with contextlib.suppress(Exception):
                await self._batch.running  # answers what was queued
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @property
    def available(self) -> bool:
        """Started and not backing off after a failure."""
        return self._redis is not None and self._clock() >= self._down_until

    # -- operations ---------------------------------------------------------------------------

    def take(
        self, kind: str, key: str, cost: float, rate: float, burst: int
    ) -> asyncio.Future[bool | None]:
        """Spend ``cost`` tokens of the shared bucket; None: Redis unavailable."""
        fut: asyncio.Future[bool | None] = self._batch.future()
        if not self.available:
            fut.set_result(None)
        else:
            self._takes.append((f"{self.prefix}:rl:{kind}:{key}", cost, rate, burst, fut))
            self._batch.kick()
        return fut

    def versions(self, accounts: list[str]) -> asyncio.Future[list[str | None] | None]:
        """The current device-list version of each account (None: none set); None overall:
        Redis unavailable."""
        fut: asyncio.Future[list[str | None] | None] = self._batch.future()
        if not self.available:
            fut.set_result(None)
        else:
            self._versions.append((accounts, fut))
            self._batch.kick()
        return fut

    async def bump_version(self, account: str) -> None:
        """A new version for the account's device list (after the change is committed)."""
        await self._direct(
            "SET",
            f"{self.prefix}:dv:{account}",
            secrets.token_hex(8),
            "PX",
            self._version_ttl_ms,
        )

    def count(self, items: list[tuple[str, int]]) -> asyncio.Future[Bounds | None]:
        """Add one envelope of each (device, bytes) to the counters; their new values, and
        whether each counter was created by this call (it then counts this envelope only)."""
        fut: asyncio.Future[Bounds | None] = self._batch.future()
        if not self.available:
            fut.set_result(None)
        else:
            self._counts.append((items, fut))
            self._batch.kick()
        return fut

    async def set_count(self, device: str, count: int, size: int) -> None:
        key = f"{self.prefix}:mq:{device}"
        await self._direct("HSET", key, "n", count, "b", size)
        await self._direct("PEXPIRE", key, self._counter_ttl_ms)

    async def add_count(self, device: str, count: int, size: int) -> None:
        key = f"{self.prefix}:mq:{device}"
        await self._direct("HINCRBY", key, "n", count)
        await self._direct("HINCRBY", key, "b", size)

    # -- internals ----------------------------------------------------------------------------

    async def _direct(self, *args: Any) -> None:
        """One command now; a failure starts the back-off and is otherwise ignored."""
        if not self.available:
            return
        assert self._redis is not None
        try:
            command = self._redis.execute_command(*args)  # type: ignore[no-untyped-call]
            await asyncio.wait_for(command, self._op_timeout_s)
            self._recovered()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)

    async def _flush_queued(self) -> None:
        takes, self._takes = self._takes, []
        versions, self._versions = self._versions, []
        counts, self._counts = self._counts, []
        await self._flush(takes, versions, counts)

    async def _flush(
        self, takes: list[_Take], versions: list[_Versions], counts: list[_Count]
    ) -> None:
        results: list[Any] | None = None
        if self._redis is not None and self.available:
            try:
                try:
                    results = await self._execute(takes, versions, counts)
                except NoScriptError:  # Redis restarted empty: load the scripts again
                    await self._load_scripts(self._redis)
                    results = await self._execute(takes, versions, counts)
                self._recovered()
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed(exc)
                results = None
        if results is None:
            self.failures += 1
            for *_, fut in takes:
                _answer(fut, None)
            for _, vfut in versions:
                _answer(vfut, None)
            for _, cfut in counts:
                _answer(cfut, None)
            return
        answers = iter(results)
        if takes:
            for (*_, fut), ok in zip(takes, next(answers), strict=True):
                _answer(fut, ok == 49)  # b"1"[0]
        if versions:
            values = iter(next(answers).decode().split(" "))
            for accs, vfut in versions:
                _answer(vfut, [None if v == "-" else v for v in _take(values, accs)])
        if counts:
            flat = iter(next(answers).split())
            for items, cfut in counts:
                _answer(
                    cfut, [(int(next(flat)), int(next(flat)), next(flat) == b"1") for _ in items]
                )

    async def _execute(
        self, takes: list[_Take], versions: list[_Versions], counts: list[_Count]
    ) -> list[Any]:
        assert self._redis is not None
        async with self._redis.pipeline(transaction=False) as pipe:
            if takes:
                keys = [t[0] for t in takes]
                args = "".join([f"{cost} {rate} {burst} " for _, cost, rate, burst, _ in takes])
                pipe.evalsha(self._take_sha, len(keys), *keys, args)
            if versions:
                keys = [f"{self.prefix}:dv:{a}" for accs, _ in versions for a in accs]
                pipe.evalsha(self._versions_sha, len(keys), *keys)
            if counts:
                keys = [f"{self.prefix}:mq:{d}" for items, _ in counts for d, _ in items]
                sizes = " ".join([str(s) for items, _ in counts for _, s in items])
                pipe.evalsha(self._count_sha, len(keys), *keys, self._counter_ttl_ms, sizes)
            return list(await asyncio.wait_for(pipe.execute(), self._op_timeout_s))

    async def _load_scripts(self, client: aioredis.Redis) -> None:
        load = client.script_load
        self._take_sha = await asyncio.wait_for(load(_TAKE), self._op_timeout_s)
        self._count_sha = await asyncio.wait_for(load(_COUNT), self._op_timeout_s)
        self._versions_sha = await asyncio.wait_for(load(_VERSIONS), self._op_timeout_s)

    def _failed(self, exc: BaseException) -> None:
        self._backoff = min(max(self._backoff * 2, 0.5), self._max_backoff_s)
        self._down_until = self._clock() + self._backoff
        log.warning(
            "redis state unavailable (%s): per-node limits for %.1fs",
            type(exc).__name__,
            self._backoff,
        )

    def _recovered(self) -> None:
        if self._backoff:
            log.info("redis state available again")
            self._backoff = 0.0


def _take(values: Any, accounts: list[str]) -> list[Any]:
    return [next(values) for _ in accounts]


def _answer(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)
