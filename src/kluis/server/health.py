"""Liveness and readiness: ``GET /healthz`` (and its older name ``/health``) and ``GET /readyz``.

Theory of operation: ``/healthz`` answers from the event loop alone (200 ``{"status": "ok"}``):
the process is up and its loop turns. ``/readyz`` says whether this node can do its work now:
each of its checks (the store answers a trivial query; when the node routes over Redis, Redis
answers a PING) must finish within ``timeout_s``. All pass: 200 ``{"status": "ready"}``; else
503 with a typed error (``not_ready``) naming each part that failed and how (``timeout`` or
``error``), so a load balancer takes the node out of rotation and an operator sees why.

The route is public (load balancers call it), so a check costs at most one query per
``cache_s``: the last result is kept that long, and concurrent requests share the check in
flight. The answer says nothing about load, users or devices (SECURITY.md, finding 15), and
nothing of an error's text (a database URL or host could be in it): that goes to the log, once
per change of state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web

log = logging.getLogger("kluis.server.health")

Check = Callable[[], Awaitable[object]]
NOT_READY = "not_ready"


@dataclass(frozen=True, slots=True)
class Readiness:
    failed: Mapping[str, str] = field(default_factory=dict)  # part -> "timeout" | "error"

    @property
    def ready(self) -> bool:
        return not self.failed

    def body(self) -> dict[str, object]:
        if self.ready:
            return {"status": "ready"}
        parts = ", ".join(f"{part}: {how}" for part, how in sorted(self.failed.items()))
        return {
            "status": "unavailable",
            "code": NOT_READY,
            "message": f"not ready ({parts})",
            "failed": dict(self.failed),
        }


class ReadinessProbe:
    """Runs the named ``checks`` concurrently, each bounded by ``timeout_s``; a result is reused
    for ``cache_s`` (``clock``: monotonic seconds)."""

    def __init__(
        self,
        checks: Mapping[str, Check],
        *,
        timeout_s: float = 2.0,
        cache_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._checks = dict(checks)
        self._timeout_s = timeout_s
        self._cache_s = cache_s
        self._clock = clock
        self._last: tuple[float, Readiness] | None = None
        self._running: asyncio.Task[Readiness] | None = None
        self._logged: Mapping[str, str] = {}

    async def readiness(self) -> Readiness:
        last = self._last
        if last is not None and self._clock() - last[0] < self._cache_s:
            return last[1]
        if self._running is None:
            self._running = asyncio.ensure_future(self._check_all())
            self._running.add_done_callback(self._finished)
        # Shielded: a client that hangs up does not cancel the check the others wait for.
        return await asyncio.shield(self._running)

    def _finished(self, task: asyncio.Task[Readiness]) -> None:
        self._running = None
        if not task.cancelled() and task.exception() is None:
            self._last = (self._clock(), task.result())

    async def _check_all(self) -> Readiness:
        names = list(self._checks)
        results = await asyncio.gather(*(self._check(name) for name in names))
        failed = {name: r[0] for name, r in zip(names, results, strict=True) if r is not None}
        if failed != self._logged:  # the log says what the public answer does not: the cause
            causes = [f"{n} {r[1]}" for n, r in zip(names, results, strict=True) if r is not None]
            if causes:
                log.warning("not ready: %s", ", ".join(causes))
            else:
                log.info("ready again")
            self._logged = failed
        return Readiness(failed)

    async def _check(self, name: str) -> tuple[str, str] | None:
        """None when the part answered in time; else (public reason, cause for the log)."""
        try:
            await asyncio.wait_for(self._checks[name](), self._timeout_s)
        except TimeoutError:
            return "timeout", f"timeout after {self._timeout_s:g} s"
        except Exception as exc:  # whatever the driver raises: the part is not usable
            return "error", type(exc).__name__
        return None


PROBE = web.AppKey("readiness", ReadinessProbe)


async def healthz(request: web.Request) -> web.Response:
    """Up or down, nothing more: how many devices are online is nobody's business."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    readiness = await request.app[PROBE].readiness()
    return web.json_response(readiness.body(), status=200 if readiness.ready else 503)


def add_routes(app: web.Application, probe: ReadinessProbe) -> None:
    app[PROBE] = probe
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/health", healthz)  # the first name; kept for existing checks
    app.router.add_get("/readyz", readyz)
