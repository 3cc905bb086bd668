"""Prometheus metrics of one node, served on a port of their own, never on the public one.

Theory of operation: each node owns one :class:`Metrics`: plain integers and bucket lists that
the event loop updates, which a collector turns into Prometheus metric families only when
``/metrics`` is scraped (in a private ``CollectorRegistry``, so several servers in one process,
as in the tests, keep their own numbers). The request path pays an addition, not a lock: it
updates them at the few places where a batch is already handled as one: a Send frame (one
addition and one observation, however many envelopes it carries), a batch handed to the
transport, an Ack frame, a login, a refused request (by its error code), a store call (by the
method's name, through :func:`timed_store`). Nothing is counted per envelope. Everything runs
on the event loop's thread (the SQLite worker thread never touches these), so no lock is needed.

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

import bisect
import hmac
import inspect
import ipaddress
import time
from collections.abc import Iterator
from typing import Any, cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from kluis.errors import RemoteProtocolError
from kluis.server.store.protocol import Store

# Seconds. From half a millisecond (a commit on an idle SQLite store) to 10 s (a stalled one).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
LOGIN_KINDS = ("register", "auth", "link")


class Histogram:
    """Counts per bucket and a sum, kept as plain numbers: an observation is a bisect and two
    additions (prometheus_client's own takes a lock, several times dearer on the send path)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts by upper bound, as the exposition format wants them."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return out


def _codes(base: type[RemoteProtocolError]) -> list[str]:
    """The codes a server can answer with (a closed set): listed from the start at 0, so that a
    rate of ``internal`` errors exists before the first one."""
    codes, todo = set(), [base]
    while todo:
        cls = todo.pop()
        codes.add(cls.code)
        todo.extend(cls.__subclasses__())
    return sorted(codes)


class Metrics:
    """The node's instruments, plain numbers updated on the event loop; ``registry`` renders
    them (with the process's own: memory, CPU, open files) for ``/metrics``."""

    def __init__(self, *, process: bool = True) -> None:
        self.connections = 0  # open now (a gauge)
        self.logins = dict.fromkeys(LOGIN_KINDS, 0)
        self.deposited = 0  # envelopes committed by sends
        self.delivered = 0  # envelopes handed to a connection's transport
        self.acked = 0  # envelopes acknowledged (and so deleted)
        self.errors = dict.fromkeys(_codes(RemoteProtocolError), 0)  # by code, every one shown
        self.send_seconds = Histogram()  # its count is the number of sends
        self.push_seconds = Histogram()
        self.store_seconds: dict[str, Histogram] = {}  # by Store method
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))
        if process:
            ProcessCollector(registry=self.registry)

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def render(self) -> bytes:
        """The text exposition format (version 0.0.4), what Prometheus scrapes."""
        return generate_latest(self.registry)


def _histogram(name: str, doc: str, h: Histogram, labels: list[str] | None = None) -> Metric:
    return HistogramMetricFamily(name, doc, buckets=h.buckets(), sum_value=h.sum, labels=labels)


class _Collector(Collector):
    """Turns :class:`Metrics`' numbers into metric families at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        yield GaugeMetricFamily(
            "kluis_connections_open", "WebSocket connections open on this node", m.connections
        )
        logins = CounterMetricFamily("kluis_logins", "Successful logins, by kind", labels=["kind"])
        for kind, count in m.logins.items():
            logins.add_metric([kind], count)
        yield logins
        yield CounterMetricFamily(
            "kluis_envelopes_deposited", "Envelopes committed to the store", m.deposited
        )
        yield CounterMetricFamily(
            "kluis_envelopes_delivered",
            "Envelopes handed to a connection's transport (live or from the backlog)",
            m.delivered,
        )
        yield CounterMetricFamily(
            "kluis_envelopes_acked", "Envelopes acknowledged (and deleted)", m.acked
        )
        errors = CounterMetricFamily(
            "kluis_errors", "Requests refused or failed, by error code", labels=["code"]
        )
        for code, count in sorted(m.errors.items()):
            errors.add_metric([code], count)
        yield errors
        yield _histogram(
            "kluis_send_seconds",
            "A Send frame, from its arrival to the commit of its envelopes",
            m.send_seconds,
        )
        yield _histogram(
            "kluis_push_seconds",
            "A live delivery, from the commit's announcement to the Deliver frame's write",
            m.push_seconds,
        )
        store = HistogramMetricFamily(
            "kluis_store_call_seconds",
            "Store calls (one transaction each), by method",
            labels=["call"],
        )
        for call, h in sorted(m.store_seconds.items()):
            store.add_metric([call], buckets=h.buckets(), sum_value=h.sum)
        yield store


class _TimedStore:
    """A ``Store`` whose coroutine methods observe their duration under their own name."""

    def __init__(self, store: Store, histograms: dict[str, Histogram]) -> None:
        self._store = store
        self._histograms = histograms

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        histogram = self._histograms.setdefault(name, Histogram())
        clock = time.perf_counter

        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return await attr(*args, **kwargs)
            finally:
                histogram.observe(clock() - start)

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
