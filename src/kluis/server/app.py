"""Wiring: the aiohttp application that carries the Kluis protocol over one WebSocket route.

Routes: ``GET /v1/ws`` (the protocol, see ``protocol/frames.py``), ``GET /healthz`` (also
``/health``) and ``GET /readyz`` (``server/health.py``), ``GET /v1/openapi.json``
(``server/openapi.py``), ``PUT``/``GET /v1/blobs/{id}`` (attachments, ``server/blob_http.py``),
``/admin/...`` (the operator's console, ``server/admin/``). ``GET /metrics`` is served on the
metrics port only (``--metrics-port``, loopback by default; ``server/metrics.py``), never here.
No access log: by default the server logs neither client addresses nor anything about messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web

from kluis.errors import LocalProtocolError, ServerError
from kluis.server import blob_http, health, logs
from kluis.server.accounts import Accounts
from kluis.server.admin.console import OperatorServices
from kluis.server.admin.store import admin_store_for
from kluis.server.admin.views import add_console
from kluis.server.blob_ledger import BlobLedger
from kluis.server.blob_shared import SharedBlobService
from kluis.server.blobs import BlobService
from kluis.server.config import ServerConfig
from kluis.server.connection import Services
from kluis.server.delivery.memory import InProcessBus
from kluis.server.delivery.protocol import DeliveryBus
from kluis.server.delivery.redis import RedisBus, RedisBusError
from kluis.server.drain import DRAIN, Drain
from kluis.server.keys import KeyDirectory
from kluis.server.mailbox import Mailbox
from kluis.server.metrics import Metrics, is_loopback, metrics_app, timed_store
from kluis.server.openapi import openapi
from kluis.server.operator import keyfile
from kluis.server.operator.subscriptions import Subscriptions
from kluis.server.operator.wipe import Wipes
from kluis.server.ratelimit import BucketMap, LogLimiter
from kluis.server.redis_state import RedisState, RedisStateError
from kluis.server.store.postgres import PostgresStore
from kluis.server.store.protocol import Store
from kluis.server.store.sealing import KeyFile
from kluis.server.store.sqlite import SqliteStore
from kluis.server.websocket import SERVICES, websocket_handler

log = logging.getLogger("kluis.server")


@dataclass(frozen=True, slots=True)
class Server:
    """One node: its configuration, its store and the services built on it."""

    config: ServerConfig
    store: Store
    services: Services


def build_services(
    config: ServerConfig, store: Store, clock: Callable[[], float] = time.time
) -> Services:
    limits = config.limits
    bus: DeliveryBus = InProcessBus()
    state: RedisState | None = None
    if config.redis_url is not None:
        try:
            bus = redis_bus = RedisBus(
                config.redis_url,
                config.redis_prefix,
                presence_ttl_s=limits.presence_ttl_s,
                presence_refresh_s=limits.presence_refresh_s,
            )
        except RedisBusError as exc:
            raise LocalProtocolError(str(exc)) from exc
        # Rate limits, mailbox counters and device-list versions shared by the nodes.
        state = RedisState(
            config.redis_url,
            config.redis_prefix,
            counter_ttl_s=limits.envelope_ttl_s + 3600,  # past the last counted envelope's expiry
            op_timeout_s=limits.redis_timeout_s,
            max_backoff_s=limits.redis_max_backoff_s,
        )
    operator = keyfile.public_info(config.data_dir)
    if operator is not None and operator.origin != config.origin:
        log.warning(
            "operator.json names %s, this server %s: announcements will be refused",
            operator.origin,
            config.origin,
        )
    operator_key = operator.public_key if operator else ""
    blobs: BlobService
    if config.redis_url is not None:  # several nodes: tickets and records in Redis, one folder
        if config.blob_dir is None:
            log.warning(
                "--redis without --blob-dir: attachments stay in this node's data folder,"
                " which the other nodes cannot read (docs/deploy.md)"
            )
        ledger = BlobLedger(
            config.redis_url, config.redis_prefix, op_timeout_s=limits.redis_timeout_s
        )
        blobs = SharedBlobService.shared(
            config.blob_path,
            limits,
            clock,
            ledger,
            _blob_tag_key(config),
            state,
            config.sweep_interval_s,
        )
    else:
        blobs = BlobService.open(config.blob_path, limits, clock, state)
    metrics = Metrics()
    store = timed_store(store, metrics)  # the services' calls, timed by method
    accounts = Accounts(
        store, clock, limits, config.origin, versions=state, changed=bus.devices_changed
    )
    if state is not None:
        redis_bus.on_devices_changed = accounts.invalidate
    return Services(
        limits=limits,
        origin=config.origin,
        accounts=accounts,
        keys=KeyDirectory(store, limits),
        mailbox=Mailbox(store, limits, clock, bus, state),
        bus=bus,
        send_buckets=BucketMap(limits.send_rate_per_s, limits.send_burst, clock, state, "send"),
        claim_buckets=BucketMap(limits.claim_rate_per_s, limits.claim_burst, clock, state, "claim"),
        target_buckets=BucketMap(
            limits.claim_target_rate_per_s, limits.claim_target_burst, clock, state, "target"
        ),
        failures=LogLimiter(log, clock),
        blobs=blobs,
        subscriptions=Subscriptions(store, clock),
        wipes=Wipes(store, config.origin, operator_key),
        operator_key=operator_key,
        metrics=metrics,
        redis_state=state,
    )


def _blob_tag_key(config: ServerConfig) -> Callable[[], bytes]:
    """The secret of the attachment ledger's device tags (``server/blob_shared.py``): the
    storage key file's index key, the same on every node; one node on SQLite without a key
    file uses a secret of its own process (its tags end with it, like its memory would)."""

    def load() -> bytes:
        path = config.storage_key_path
        if config.on_postgres or path.exists():
            return KeyFile(path).load().index_key
        return secrets.token_bytes(32)

    return load


def is_database_url(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL database (the only kind ``--database`` takes)."""
    return url.startswith(("postgresql://", "postgres://"))


def open_store(config: ServerConfig) -> Store:
    """The node's store: PostgreSQL at ``database_url`` when set, else SQLite in the data folder.
    A PostgreSQL store connects (and migrates) at its first call, or at ``PostgresStore.open``."""
    if config.database_url is not None:
        if not is_database_url(config.database_url):
            raise LocalProtocolError("--database takes a postgresql://... URL")
        return PostgresStore(
            config.database_url,
            max_connections=config.database_pool,
            key_file=config.storage_key_path,
        )
    return SqliteStore(config.database_path, synchronous=config.sqlite_synchronous)


def open_server(config: ServerConfig, clock: Callable[[], float] = time.time) -> Server:
    # The node's own files (admin.key, attachments, the storage key file by default) live in the
    # data folder on PostgreSQL too: made here, owner only, as the SQLite store makes its own.
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = open_store(config)
    return Server(config=config, store=store, services=build_services(config, store, clock))


def create_licences(config: ServerConfig, count: int, days: int) -> list[str]:
    """New licence codes in the node's store (the `kluis licence create` command)."""

    async def create() -> list[str]:
        store = open_store(config)
        try:
            return await Accounts(store, time.time, config.limits).create_licences(count, days)
        finally:
            await store.close()

    return asyncio.run(create())


def readiness_probe(server: Server) -> health.ReadinessProbe:
    """The checks of ``/readyz``: a trivial store query, and a Redis PING when on Redis."""
    store = server.store  # not the timed one: probes stay out of the store's metrics
    checks: dict[str, health.Check] = {"store": lambda: store.account("")}
    bus = server.services.bus
    if isinstance(bus, RedisBus):
        checks["redis"] = bus.ping
    config = server.config
    return health.ReadinessProbe(
        checks, timeout_s=config.ready_timeout_s, cache_s=config.ready_cache_s
    )


def check_metrics_address(config: ServerConfig) -> None:
    """Refuse metrics on an address beyond this machine without a token (finding 15)."""
    if config.metrics_port is None:
        return
    if config.metrics_port == config.port and config.metrics_host == config.host:
        raise LocalProtocolError("--metrics-port must differ from the public --port")
    if not is_loopback(config.metrics_host) and not config.metrics_token:
        raise LocalProtocolError(
            f"metrics on {config.metrics_host} (not loopback) need a token: set KLUIS_METRICS_TOKEN"
            " or metrics_token in the config file"
        )


async def _metrics_site(server: Server) -> AsyncIterator[None]:
    """Serve ``/metrics`` on the metrics port while the application runs."""
    config = server.config
    if config.metrics_port is None:
        yield
        return
    runner = web.AppRunner(
        metrics_app(server.services.metrics, config.metrics_token), access_log=None
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.metrics_host, config.metrics_port)
        try:
            await site.start()
        except OSError as exc:
            raise LocalProtocolError(
                f"cannot listen on {config.metrics_host}:{config.metrics_port} for metrics:"
                f" {exc.strerror or exc}"
            ) from exc
        log.info("metrics on %s:%d", config.metrics_host, config.metrics_port)
        yield
    finally:
        await runner.cleanup()


async def _sweeper(server: Server) -> None:
    while True:
        await asyncio.sleep(server.config.sweep_interval_s)
        try:
            envelopes = await server.services.mailbox.sweep()
            if envelopes:
                log.info("expired %d undelivered envelopes", envelopes)
        except Exception:
            log.exception("sweep failed")


async def _checkpointer(server: Server) -> None:
    """Let the store fold its WAL soon after envelopes are written or deleted: until then it
    holds copies of acknowledged envelopes, and the frames of recent sends in deposit order
    (store/sqlite.py)."""
    while True:
        await asyncio.sleep(server.config.checkpoint_interval_s)
        try:
            await server.services.mailbox.maintenance()
        except Exception:
            log.exception("checkpoint failed")


async def _blob_sweeper(server: Server) -> None:
    """Delete expired attachments and forget expired tickets."""
    blobs = server.services.blobs
    while blobs is not None:
        await asyncio.sleep(server.config.sweep_interval_s)
        try:
            expired = await blobs.sweep()
            if expired:
                log.info("expired %d attachments", expired)
        except Exception:
            log.exception("attachment sweep failed")


def build_app(server: Server) -> web.Application:
    app = web.Application(client_max_size=server.config.limits.max_frame_bytes)
    app[SERVICES] = server.services
    app[DRAIN] = Drain()
    app.router.add_get("/v1/ws", websocket_handler)
    health.add_routes(app, readiness_probe(server))  # /healthz, /health, /readyz
    app.router.add_get("/v1/openapi.json", openapi)  # describes the routes above: keep in step
    if server.services.blobs is not None:
        blob_http.add_routes(app, server.services.blobs)
    admin_store = admin_store_for(server.store)  # the console's tables, beside the store's
    if admin_store is not None:
        services, operator = server.services, None
        if services.subscriptions is not None and services.wipes is not None:
            operator = OperatorServices(
                data_dir=server.config.data_dir,
                store=server.store,
                mailbox=services.mailbox,
                bus=services.bus,
                subscriptions=services.subscriptions,
                wipes=services.wipes,
            )
        add_console(app, server.config, admin_store, operator)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        bus = server.services.bus
        if isinstance(bus, RedisBus):
            await bus.start()  # already started by _run; idempotent
        state = server.services.redis_state
        if state is not None:
            await state.start()  # likewise
        blobs = server.services.blobs
        if isinstance(blobs, SharedBlobService):
            await blobs.ledger.start()  # likewise
        tasks = [asyncio.create_task(_sweeper(server)), asyncio.create_task(_checkpointer(server))]
        tasks.append(asyncio.create_task(_blob_sweeper(server)))
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if isinstance(bus, RedisBus):
            await bus.close()
        if state is not None:
            await state.close()
        if isinstance(blobs, SharedBlobService):
            await blobs.ledger.close()
        await server.store.close()

    check_metrics_address(server.config)
    app.cleanup_ctx.append(lambda app: _metrics_site(server))  # first: if its port fails, stop
    app.cleanup_ctx.append(lifecycle)
    return app


def serve(config: ServerConfig) -> None:
    """Run one node until SIGINT or SIGTERM (the `kluis serve` command). A port that cannot
    be bound is a LocalProtocolError naming it; "listening" is logged only once it is bound."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is optional off Linux
        pass
    logs.install()  # no client address in any library's log line
    server = open_server(config)
    asyncio.run(_run(server, config))


async def _run(server: Server, config: ServerConfig) -> None:
    runner = web.AppRunner(
        build_app(server),
        access_log=None,
        keepalive_timeout=config.limits.handshake_timeout_s,
        shutdown_timeout=3.0,  # open WebSockets get this long to finish; clients reconnect
    )
    if isinstance(server.store, PostgresStore):
        # Connect and migrate before listening: a wrong URL or a down database fails here.
        try:
            await server.store.open()
        except ConnectionError as exc:
            raise LocalProtocolError(str(exc)) from exc
    if isinstance(server.services.bus, RedisBus):
        # Likewise Redis: a node that cannot route to the others must not accept connections.
        try:
            await server.services.bus.start()
            if server.services.redis_state is not None:
                await server.services.redis_state.start()
            if isinstance(server.services.blobs, SharedBlobService):
                await server.services.blobs.ledger.start()
        except (RedisBusError, RedisStateError, ServerError) as exc:
            raise LocalProtocolError(str(exc)) from exc
    await runner.setup()
    try:
        # backlog: reconnect storms (thousands of devices after a restart) overflowed 128
        site = web.TCPSite(runner, config.host, config.port, backlog=2048)
        try:
            await site.start()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise LocalProtocolError(
                f"cannot listen on {config.host}:{config.port}: {reason}"
            ) from exc
        log.info("kluis listening on %s:%d", config.host, config.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("kluis stopping")
        # The drain (server/drain.py): accept no more, send every client elsewhere (1001),
        # let requests in hand commit and answer; bounded by drain_timeout_s.
        await site.stop()
        await runner.app[DRAIN].run(config.drain_timeout_s)
    finally:
        await runner.cleanup()
