"""Reconnection rules (pure): back-off with jitter, reset after a stable connection, node URLs.

Theory of operation. When a node of a deployment dies, its clients' connections drop at the same
instant and all of them come back. :class:`BackoffPolicy` says how long to wait before attempt
``n``: exponential from ``base_s``, capped at ``cap_s``, with *full jitter* (uniform in
``[0, ceiling)``), so that the thousands of clients one crash cut off spread their logins over
the whole window instead of arriving together (the Textual app keeps *equal jitter*, half fixed
and half random: :func:`delay` computes both). :class:`Backoff` holds the count of failures in a
row; a connection that stayed up ``stable_after_s`` resets it, a node that accepts and drops at
once does not. A close with 1001 ("going away": the node is draining) is not a failure: the next
attempt comes within ``going_away_spread_s``, with no back-off.

:class:`Endpoints` rotates among several node URLs of one deployment (all answer with the same
origin, the ``--public-url`` the profile was registered at); every drop moves to the next.

No I/O, no clock, no randomness of its own: the caller (``client/reconnect.py``) injects them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from kluis.errors import LocalProtocolError

GOING_AWAY = 1001  # RFC 6455: the endpoint is going away (a node draining on SIGTERM)
Jitter = Literal["full", "equal"]


def delay(
    attempt: int, random: Callable[[], float], base: float, cap: float, jitter: Jitter
) -> float:
    """Seconds before attempt ``attempt`` (0 first): ``min(cap, base * 2**attempt)``, jittered.
    ``random()`` is uniform in [0, 1)."""
    ceiling = min(cap, base * 2 ** min(max(attempt, 0), 32))
    if jitter == "equal":
        return float(ceiling / 2 + random() * ceiling / 2)
    return float(random() * ceiling)


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """How a client waits between connection attempts (see the module's docstring)."""

    base_s: float = 0.5
    cap_s: float = 30.0
    stable_after_s: float = 10.0  # a connection up this long resets the back-off
    going_away_spread_s: float = 0.5  # after a 1001 close: reconnect within this, no back-off
    jitter: Jitter = "full"

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.cap_s:
            raise LocalProtocolError("back-off: need 0 < base_s <= cap_s")
        if self.stable_after_s < 0 or self.going_away_spread_s < 0:
            raise LocalProtocolError("back-off: stable_after_s and going_away_spread_s >= 0")
        if self.jitter not in ("full", "equal"):
            raise LocalProtocolError(f"back-off: jitter is full or equal, not {self.jitter!r}")

    def delay(self, attempt: int, random: Callable[[], float]) -> float:
        return delay(attempt, random, self.base_s, self.cap_s, self.jitter)


class Backoff:
    """The back-off state of one client: failures in a row, and since when it is up."""

    def __init__(
        self,
        policy: BackoffPolicy,
        *,
        clock: Callable[[], float],
        random: Callable[[], float],
    ) -> None:
        self.policy, self._clock, self._random = policy, clock, random
        self.attempt = 0  # failures since the last stable connection
        self._up_since: float | None = None

    def up(self) -> None:
        """A connection is up (logged in)."""
        self._up_since = self._clock()

    def down(self, *, going_away: bool = False) -> float:
        """The connection ended, or an attempt failed: seconds to wait before the next one."""
        up_since, self._up_since = self._up_since, None
        if up_since is not None and (
            going_away or self._clock() - up_since >= self.policy.stable_after_s
        ):
            self.attempt = 0
        if going_away and up_since is not None:
            return self._random() * self.policy.going_away_spread_s
        wait = self.policy.delay(self.attempt, self._random)
        self.attempt += 1
        return wait


class Endpoints:
    """Node URLs of one deployment, tried in turn from a random start (clients spread out)."""

    def __init__(self, urls: Sequence[str], random: Callable[[], float]) -> None:
        if not urls:
            raise LocalProtocolError("endpoints: give at least one URL")
        for url in urls:
            if not url.startswith(("http://", "https://", "ws://", "wss://")):
                raise LocalProtocolError(f"endpoints: not an http(s) or ws(s) URL: {url!r}")
        self.urls = list(urls)
        self._i = min(int(random() * len(self.urls)), len(self.urls) - 1)

    @property
    def current(self) -> str:
        return self.urls[self._i]

    def advance(self) -> str:
        self._i = (self._i + 1) % len(self.urls)
        return self.current
