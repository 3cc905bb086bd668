"""Wiring: the aiohttp application that carries the Kluis protocol over one WebSocket route.

Routes: ``GET /v1/ws`` (the protocol, see ``protocol/frames.py``), ``GET /health``,
``GET /v1/openapi.json`` (``server/openapi.py``). No access log:
by default the server logs neither client addresses nor anything about messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiohttp import web

from kluis.server import logs
from kluis.server.accounts import Accounts
from kluis.server.config import ServerConfig
from kluis.server.connection import Connection
from kluis.server.keys import KeyDirectory
from kluis.server.mailbox import Mailbox
from kluis.server.openapi import openapi
from kluis.server.ratelimit import BucketMap, LogLimiter
from kluis.server.store import SqliteStore
from kluis.server.websocket import websocket_handler

log = logging.getLogger("kluis.server")


@dataclass
class ServerState:
    config: ServerConfig
    store: SqliteStore
    clock: Callable[[], float] = time.time
    accounts: Accounts = field(init=False)
    keys: KeyDirectory = field(init=False)
    mailbox: Mailbox = field(init=False)
    connections: dict[str, Connection] = field(default_factory=dict)
    # Token buckets kept across connections (reconnecting buys no fresh burst): sends and key
    # claims per device, and one-time keys handed out per target device, whoever claims.
    send_buckets: BucketMap = field(init=False)
    claim_buckets: BucketMap = field(init=False)
    target_buckets: BucketMap = field(init=False)
    failures: LogLimiter = field(init=False)  # requests that failed inside the server

    @property
    def origin(self) -> str:
        """The origin clients reach this server at; every login signature is bound to it."""
        return self.config.origin

    def __post_init__(self) -> None:
        limits = self.config.limits
        self.accounts = Accounts(self.store, self.clock, limits, self.origin)
        self.keys = KeyDirectory(self.store, limits)
        self.mailbox = Mailbox(self.store, limits, self.clock)
        self.send_buckets = BucketMap(limits.send_rate_per_s, limits.send_burst, self.clock)
        self.claim_buckets = BucketMap(limits.claim_rate_per_s, limits.claim_burst, self.clock)
        self.target_buckets = BucketMap(
            limits.claim_target_rate_per_s, limits.claim_target_burst, self.clock
        )
        self.failures = LogLimiter(log, self.clock)


def open_state(config: ServerConfig, clock: Callable[[], float] = time.time) -> ServerState:
    store = SqliteStore(config.database_path, synchronous=config.sqlite_synchronous)
    return ServerState(config=config, store=store, clock=clock)


async def health(request: web.Request) -> web.Response:
    """Up or down, nothing more: how many devices are online is nobody's business."""
    return web.json_response({"status": "ok"})


async def _sweeper(state: ServerState) -> None:
    while True:
        await asyncio.sleep(state.config.sweep_interval_s)
        try:
            envelopes, _links = state.store.sweep(int(state.clock()))
            if envelopes:
                state.mailbox.expired()  # a full mailbox may have room again
                log.info("expired %d undelivered envelopes", envelopes)
        except Exception:
            log.exception("sweep failed")


async def _checkpointer(state: ServerState) -> None:
    """Fold the WAL soon after envelopes are written or deleted: until then it holds copies of
    acknowledged envelopes, and the frames of recent sends in deposit order (store.py)."""
    while True:
        await asyncio.sleep(state.config.checkpoint_interval_s)
        if state.store.needs_checkpoint:
            try:
                state.store.checkpoint()
            except Exception:
                log.exception("checkpoint failed")


def build_app(state: ServerState) -> web.Application:
    app = web.Application(client_max_size=state.config.limits.max_frame_bytes)
    app["state"] = state
    app.router.add_get("/v1/ws", websocket_handler)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/openapi.json", openapi)  # describes the routes above: keep in step

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(_sweeper(state)), asyncio.create_task(_checkpointer(state))]
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        state.store.close()

    app.cleanup_ctx.append(lifecycle)
    return app


def serve(config: ServerConfig) -> None:
    """Run one node until interrupted (the `kluis serve` command)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is optional off Linux
        pass
    logs.install()  # no client address in any library's log line
    state = open_state(config)
    log.info("kluis listening on %s:%d", config.host, config.port)
    web.run_app(
        build_app(state),
        host=config.host,
        port=config.port,
        access_log=None,
        keepalive_timeout=config.limits.handshake_timeout_s,
        backlog=2048,  # reconnect storms (thousands of devices after a restart) overflowed 128
        print=None,
        handle_signals=True,
    )
