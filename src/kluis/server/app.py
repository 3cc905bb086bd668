"""Wiring: the aiohttp application that carries the Kluis protocol over one WebSocket route.

Routes: ``GET /v1/ws`` (the protocol, see ``protocol/frames.py``), ``GET /health``,
``GET /v1/openapi.json`` (``server/openapi.py``), ``PUT``/``GET /v1/blobs/{id}`` (attachments,
``server/blob_http.py``), ``/admin/...`` (the operator's console, ``server/admin/``). No access log:
by default the server logs neither client addresses nor anything about messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web

from kluis.errors import LocalProtocolError
from kluis.server import blob_http, logs
from kluis.server.accounts import Accounts
from kluis.server.admin.console import OperatorServices
from kluis.server.admin.views import add_console
from kluis.server.blobs import BlobService
from kluis.server.config import ServerConfig
from kluis.server.connection import Services
from kluis.server.delivery.memory import InProcessBus
from kluis.server.delivery.protocol import DeliveryBus
from kluis.server.delivery.redis import RedisBus, RedisBusError
from kluis.server.drain import DRAIN, Drain
from kluis.server.keys import KeyDirectory
from kluis.server.mailbox import Mailbox
from kluis.server.openapi import openapi
from kluis.server.operator import keyfile
from kluis.server.operator.subscriptions import Subscriptions
from kluis.server.operator.wipe import Wipes
from kluis.server.ratelimit import BucketMap, LogLimiter
from kluis.server.store.postgres import PostgresStore
from kluis.server.store.protocol import Store
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
    if config.redis_url is not None:
        try:
            bus = RedisBus(config.redis_url, config.redis_prefix)
        except RedisBusError as exc:
            raise LocalProtocolError(str(exc)) from exc
    operator = keyfile.public_info(config.data_dir)
    if operator is not None and operator.origin != config.origin:
        log.warning(
            "operator.json names %s, this server %s: announcements will be refused",
            operator.origin,
            config.origin,
        )
    operator_key = operator.public_key if operator else ""
    return Services(
        limits=limits,
        origin=config.origin,
        accounts=Accounts(store, clock, limits, config.origin),
        keys=KeyDirectory(store, limits),
        mailbox=Mailbox(store, limits, clock, bus),
        bus=bus,
        send_buckets=BucketMap(limits.send_rate_per_s, limits.send_burst, clock),
        claim_buckets=BucketMap(limits.claim_rate_per_s, limits.claim_burst, clock),
        target_buckets=BucketMap(limits.claim_target_rate_per_s, limits.claim_target_burst, clock),
        failures=LogLimiter(log, clock),
        blobs=BlobService.open(config.data_dir / "blobs", limits, clock),
        subscriptions=Subscriptions(store, clock),
        wipes=Wipes(store, config.origin, operator_key),
        operator_key=operator_key,
    )


def is_database_url(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL database (the only kind ``--database`` takes)."""
    return url.startswith(("postgresql://", "postgres://"))


def open_store(config: ServerConfig) -> Store:
    """The node's store: PostgreSQL at ``database_url`` when set, else SQLite in the data folder.
    A PostgreSQL store connects (and migrates) at its first call, or at ``PostgresStore.open``."""
    if config.database_url is not None:
        if not is_database_url(config.database_url):
            raise LocalProtocolError("--database takes a postgresql://... URL")
        return PostgresStore(config.database_url)
    return SqliteStore(config.database_path, synchronous=config.sqlite_synchronous)


def open_server(config: ServerConfig, clock: Callable[[], float] = time.time) -> Server:
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


async def health(request: web.Request) -> web.Response:
    """Up or down, nothing more: how many devices are online is nobody's business."""
    return web.json_response({"status": "ok"})


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
    app.router.add_get("/health", health)
    app.router.add_get("/v1/openapi.json", openapi)  # describes the routes above: keep in step
    if server.services.blobs is not None:
        blob_http.add_routes(app, server.services.blobs)
    if isinstance(server.store, SqliteStore):  # the console keeps its tables beside the store's
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
        add_console(app, server.config, server.store, operator)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        bus = server.services.bus
        if isinstance(bus, RedisBus):
            await bus.start()  # already started by _run; idempotent
        tasks = [asyncio.create_task(_sweeper(server)), asyncio.create_task(_checkpointer(server))]
        tasks.append(asyncio.create_task(_blob_sweeper(server)))
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if isinstance(bus, RedisBus):
            await bus.close()
        await server.store.close()

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
        except RedisBusError as exc:
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
