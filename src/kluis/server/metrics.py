"""Prometheus metrics of one node, served on a port of their own, never on the public one.

Theory of operation: each node owns one :class:`Metrics`, a private ``CollectorRegistry`` (so
several servers in one process, as in the tests, keep their own numbers) holding a fixed set of
counters, one gauge and histograms. The request path updates them at the few places where a
batch is already handled as one: a Send frame (one increment and one observation, however many
envelopes it carries), a batch handed to the transport, an Ack frame, a login, a
refused request (by its error code), a store call (by the method's name, through
:func:`timed_store`). Nothing is counted per envelope.

What the numbers may say: totals for the whole node. No label names a user, an account, a
device or an address; the only labels are the login kind, the error code (a closed set, from
``kluis.errors``) and the store method (a closed set, the ``Store`` protocol). Even so, the
number of open connections says how many devices are online, which the public must not learn
(SECURITY.md, finding 15): :func:`metrics_app` is served by ``app.py`` on ``--metrics-port``,
bound to loopback by default, and a non-loopback address needs a bearer token.

Push latency is measured from the moment the bus announces a committed envelope to a connection
until its Deliver frame is handed to the transport: it covers the live path only (a backlog read
from the store has no commit time; envelopes carry no date) and, across nodes, starts when the
announcement reaches the recipient's node.
"""

from __future__ import annotations

import hmac
import inspect
import ipaddress
import time
from typing import Any, cast

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from kluis.server.store.protocol import Store

# Seconds. From half a millisecond (a commit on an idle SQLite store) to 10 s (a stalled one).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
LOGIN_KINDS = ("register", "auth", "link")


class Metrics:
    """The node's instruments; ``registry`` is what ``/metrics`` renders."""

    def __init__(self, *, process: bool = True) -> None:
        r = self.registry = CollectorRegistry()
        if process:  # resident memory, CPU seconds, open files of this process
            ProcessCollector(registry=r)
        self.connections = Gauge(
            "kluis_connections_open", "WebSocket connections open on this node", registry=r
        )
        self.logins = Counter("kluis_logins", "Successful logins, by kind", ["kind"], registry=r)
        self.login = {kind: self.logins.labels(kind) for kind in LOGIN_KINDS}
        self.deposited = Counter(
            "kluis_envelopes_deposited", "Envelopes committed to the store", registry=r
        )
        self.delivered = Counter(
            "kluis_envelopes_delivered",
            "Envelopes handed to a connection's transport (live or from the backlog)",
            registry=r,
        )
        self.acked = Counter(
            "kluis_envelopes_acked", "Envelopes acknowledged (and deleted)", registry=r
        )
        self.errors = Counter(
            "kluis_errors", "Requests refused or failed, by error code", ["code"], registry=r
        )
        self.send_seconds = Histogram(  # its _count is the number of sends
            "kluis_send_seconds",
            "A Send frame, from its arrival to the commit of its envelopes",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.push_seconds = Histogram(
            "kluis_push_seconds",
            "A live delivery, from the commit's announcement to the Deliver frame's write",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_seconds = Histogram(
            "kluis_store_call_seconds",
            "Store calls (one transaction each), by method",
            ["call"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def render(self) -> bytes:
        """The text exposition format (version 0.0.4), what Prometheus scrapes."""
        return generate_latest(self.registry)


class _TimedStore:
    """A ``Store`` whose coroutine methods observe their duration under their own name."""

    def __init__(self, store: Store, histogram: Histogram) -> None:
        self._store = store
        self._histogram = histogram

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        child = self._histogram.labels(name)
        clock = time.perf_counter

        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return await attr(*args, **kwargs)
            finally:
                child.observe(clock() - start)

        setattr(self, name, timed)  # next time an instance attribute: no __getattr__ at all
        return timed


def timed_store(store: Store, metrics: Metrics) -> Store:
    """``store`` with every call timed into ``kluis_store_call_seconds``."""
    return cast(Store, _TimedStore(store, metrics.store_seconds))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


METRICS = web.AppKey("metrics", Metrics)


def metrics_app(metrics: Metrics, token: str | None = None) -> web.Application:
    """The metrics port's application: ``GET /metrics`` and nothing else. With ``token``, a
    request must carry ``Authorization: Bearer TOKEN`` (compared in constant time)."""
    app = web.Application()
    app[METRICS] = metrics
    expected = f"Bearer {token}".encode() if token else None

    async def scrape(request: web.Request) -> web.Response:
        if expected is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response(
                    {"code": "unauthenticated", "message": "a bearer token is needed"},
                    status=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        body = request.app[METRICS].render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    app.router.add_get("/metrics", scrape)
    return app
