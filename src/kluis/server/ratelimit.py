"""Token buckets, keyed by device, with an injected clock so tests need not sleep."""

from __future__ import annotations

from collections.abc import Callable


class TokenBucket:
    __slots__ = ("_burst", "_clock", "_rate", "_stamp", "_tokens")

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def take(self, n: float = 1.0) -> bool:
        """Spend ``n`` tokens if available; False means the caller is over its rate."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False
