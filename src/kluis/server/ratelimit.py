"""Token buckets keyed by device, and a rate-limited log line, with an injected clock.

A bucket that has refilled to its burst is indistinguishable from a new one, so a
:class:`BucketMap` drops full buckets now and then: it holds only keys active lately, however
many devices ever asked.

With several nodes (``kluis serve --redis``), a :class:`BucketMap` is given the deployment's
:class:`SharedBuckets` (``server/redis_state.py``): :meth:`BucketMap.take_shared` then spends
from one bucket per key in Redis, so N nodes do not allow N times the rate, and falls back to
this node's own bucket while Redis does not answer (fail open to the per-node limit). Without
Redis, callers keep the synchronous ``get(key).take()``: no await on the hot path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol


class TokenBucket:
    __slots__ = ("_burst", "_clock", "_rate", "_stamp", "_tokens")

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def take(self, n: float = 1.0) -> bool:
        """Spend ``n`` tokens if available; False means the caller is over its rate."""
        self._refill()
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False

    @property
    def full(self) -> bool:
        self._refill()
        return self._tokens >= self._burst


class SharedBuckets(Protocol):
    """Token buckets kept outside the process, one per ``kind`` and key."""

    def take(
        self, kind: str, key: str, cost: float, rate: float, burst: int
    ) -> Awaitable[bool | None]:
        """Spend ``cost`` tokens: True or False, or None when the shared state is unavailable."""
        ...


class BucketMap:
    """One bucket per key, created full on first use; full buckets are pruned periodically."""

    __slots__ = ("_buckets", "_burst", "_clock", "_next_prune", "_rate", "kind", "shared")

    PRUNE_EVERY_S = 60.0

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float],
        shared: SharedBuckets | None = None,
        kind: str = "",
    ) -> None:
        self._rate, self._burst, self._clock = rate_per_s, burst, clock
        self._buckets: dict[str, TokenBucket] = {}
        self._next_prune = clock() + self.PRUNE_EVERY_S
        self.shared, self.kind = shared, kind  # kind names the shared buckets: send, claim...

    async def take_shared(self, key: str, n: float = 1.0) -> bool:
        """Spend from the shared bucket of ``key``; from the local one when there is none or
        it is unavailable."""
        if self.shared is not None:
            taken = await self.shared.take(self.kind, key, n, self._rate, self._burst)
            if taken is not None:
                return taken
        return self.get(key).take(n)

    async def take_many(self, keys: list[str]) -> dict[str, bool]:
        """One token of each key's bucket (each key once), asked together: on Redis, all in
        one round trip."""
        keys = list(dict.fromkeys(keys))
        if self.shared is None:
            return {k: self.get(k).take() for k in keys}
        asked = [self.shared.take(self.kind, k, 1.0, self._rate, self._burst) for k in keys]
        answers = await asyncio.gather(*asked)
        return {
            k: self.get(k).take() if a is None else a for k, a in zip(keys, answers, strict=True)
        }

    def __len__(self) -> int:
        return len(self._buckets)

    def get(self, key: str) -> TokenBucket:
        if self._clock() >= self._next_prune:
            self.prune()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self._rate, self._burst, self._clock)
        return bucket

    def prune(self) -> None:
        """Forget the buckets that have refilled: a new one would be the same."""
        self._next_prune = self._clock() + self.PRUNE_EVERY_S
        for key in [k for k, b in self._buckets.items() if b.full]:
            del self._buckets[key]


class LogLimiter:
    """At most one line per ``interval_s``; the lines held back are counted in the next one.

    For failures a client can trigger at will: a traceback (or the frame) per failure would let
    anyone fill the disk and would put request data in the log.
    """

    __slots__ = ("_clock", "_interval", "_last", "_log", "_suppressed")

    def __init__(
        self, log: logging.Logger, clock: Callable[[], float], interval_s: float = 1.0
    ) -> None:
        self._log, self._clock, self._interval = log, clock, interval_s
        self._last = float("-inf")
        self._suppressed = 0

    def error(self, what: str, exc: BaseException) -> None:
        """Log ``what`` and the exception's type name (never its message, never a traceback)."""
        now = self._clock()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        suppressed, self._suppressed, self._last = self._suppressed, 0, now
        self._log.error(
            "%s: %s (%d more since the last such line)", what, type(exc).__name__, suppressed
        )
