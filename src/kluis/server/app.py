"""Wiring: the aiohttp application that carries the Kluis protocol over one WebSocket route.

Routes: ``GET /v1/ws`` (the protocol, see ``protocol/frames.py``), ``GET /health``. No access log:
by default the server logs neither client addresses nor anything about messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiohttp import WSCloseCode, WSMsgType, web

from kluis.errors import FrameTooLarge, MalformedFrame
from kluis.protocol import frames as f
from kluis.server.accounts import Accounts
from kluis.server.config import ServerConfig
from kluis.server.connection import Connection
from kluis.server.keys import KeyDirectory
from kluis.server.mailbox import Mailbox
from kluis.server.store import SqliteStore

log = logging.getLogger("kluis.server")

# The transport accepts frames up to this multiple of the configured limit so that a frame a
# little too large gets a typed error on a live connection; far larger ones close it (1009).
_HARD_FRAME_FACTOR = 4


@dataclass
class ServerState:
    config: ServerConfig
    store: SqliteStore
    clock: Callable[[], float] = time.time
    accounts: Accounts = field(init=False)
    keys: KeyDirectory = field(init=False)
    mailbox: Mailbox = field(init=False)
    connections: dict[str, Connection] = field(default_factory=dict)

    def __post_init__(self) -> None:
        limits = self.config.limits
        self.accounts = Accounts(self.store, self.clock, limits)
        self.keys = KeyDirectory(self.store, limits)
        self.mailbox = Mailbox(self.store, limits, self.clock)


def open_state(config: ServerConfig, clock: Callable[[], float] = time.time) -> ServerState:
    store = SqliteStore(config.database_path, synchronous=config.sqlite_synchronous)
    return ServerState(config=config, store=store, clock=clock)


async def _writer(ws: web.WebSocketResponse, conn: Connection, wake: asyncio.Event) -> None:
    """Sends pushes for one connection, batched: one wake-up drains everything queued."""
    while not ws.closed:
        await wake.wait()
        wake.clear()
        for frame in conn.take_outgoing():
            await ws.send_bytes(frame)
        if conn.close_requested:
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"replaced or revoked")
            return


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app["state"]
    limits = state.config.limits
    ws = web.WebSocketResponse(
        max_msg_size=limits.max_frame_bytes * _HARD_FRAME_FACTOR, compress=False, heartbeat=60
    )
    await ws.prepare(request)
    wake = asyncio.Event()
    conn = Connection(state, wake.set)
    writer = asyncio.create_task(_writer(ws, conn, wake))
    try:
        await ws.send_bytes(f.encode(f.Challenge(nonce=conn.nonce)))
        while True:
            timeout = limits.auth_timeout_s if conn.state.name == "AWAITING_AUTH" else None
            try:
                msg = await ws.receive(timeout=timeout)
            except TimeoutError:
                await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"auth timeout")
                break
            if msg.type == WSMsgType.BINARY:
                await ws.send_bytes(await conn.handle(msg.data))
            elif msg.type == WSMsgType.TEXT:
                err = MalformedFrame("frames are binary msgpack")
                await ws.send_bytes(f.encode(f.Error(rid=None, code=err.code, message=err.message)))
            elif msg.type == WSMsgType.ERROR:
                if isinstance(msg.data, Exception) and "too big" in str(msg.data).lower():
                    code = FrameTooLarge.code
                    await ws.close(code=WSCloseCode.MESSAGE_TOO_BIG, message=code.encode())
                break
            else:  # CLOSE, CLOSING, CLOSED
                break
            if conn.close_requested:
                wake.set()
    finally:
        conn.closed()
        wake.set()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer
        if not ws.closed:
            await ws.close()
    return ws


async def health(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    return web.json_response({"status": "ok", "connections": len(state.connections)})


async def _sweeper(state: ServerState) -> None:
    while True:
        await asyncio.sleep(state.config.sweep_interval_s)
        try:
            envelopes, _links = state.store.sweep(int(state.clock()))
            if envelopes:
                log.info("expired %d undelivered envelopes", envelopes)
            state.store.checkpoint()
        except Exception:
            log.exception("sweep failed")


def build_app(state: ServerState) -> web.Application:
    app = web.Application(client_max_size=state.config.limits.max_frame_bytes)
    app["state"] = state
    app.router.add_get("/v1/ws", websocket_handler)
    app.router.add_get("/health", health)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_sweeper(state))
        yield
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
    state = open_state(config)
    log.info("kluis listening on %s:%d", config.host, config.port)
    web.run_app(
        build_app(state),
        host=config.host,
        port=config.port,
        access_log=None,
        print=None,
        handle_signals=True,
    )
