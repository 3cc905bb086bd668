"""The drain (server/drain.py) on a real aiohttp site on loopback: a Send in hand when the drain
begins commits and is answered before the 1001 close; idle connections get 1001 at once; a
connection that arrives while draining is sent away after its challenge."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from kluis.client.client import KluisClient
from kluis.errors import TransportError
from kluis.protocol import frames as f
from kluis.server.app import Server, build_app, open_server
from kluis.server.config import ServerConfig
from kluis.server.drain import DRAIN
from tests.kluis_testing import PASSPHRASE, fast_kdf, free_port


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[Server, web.Application, str]]:
    config = ServerConfig(data_dir=tmp_path / "server", port=free_port())
    config.data_dir.mkdir()
    server = open_server(config)
    app = build_app(server)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", config.port)
    await site.start()
    try:
        yield server, app, f"http://127.0.0.1:{config.port}"
    finally:
        await runner.cleanup()


async def _register(server: Server, url: str, profile: Path) -> KluisClient:
    (code,) = await server.services.accounts.create_licences(1, 30)
    return await KluisClient.register(url, code, profile, PASSPHRASE, kdf=fast_kdf())


async def test_a_send_in_hand_is_answered_before_the_going_away_close(
    node: tuple[Server, web.Application, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, app, url = node
    alice = await _register(server, url, tmp_path / "alice")
    bob = await _register(server, url, tmp_path / "bob")
    await alice.refresh_devices(bob.account_id)
    mailbox = server.services.mailbox
    deposit: Callable[[list[tuple[str, bytes]]], Awaitable[list[int]]] = mailbox.deposit
    entered, release = asyncio.Event(), asyncio.Event()

    async def held(items: list[tuple[str, bytes]]) -> list[int]:
        entered.set()
        await release.wait()  # the Send is in hand: its commit waits here
        return await deposit(items)

    monkeypatch.setattr(mailbox, "deposit", held)
    session = aiohttp.ClientSession()
    try:
        sending = asyncio.create_task(alice.send(bob.account_id, "in flight"))
        await asyncio.wait_for(entered.wait(), 10)
        drain = app[DRAIN]
        draining = asyncio.create_task(drain.run(10))
        # Bob was idle: told to go at once.
        with pytest.raises(TransportError) as info:
            await bob.receive(wait=5)
        assert info.value.details.get("close_code") == 1001
        # A connection that arrives now gets its challenge, then 1001.
        ws = await session.ws_connect(url + "/v1/ws")
        first = await ws.receive(timeout=5)
        assert isinstance(f.decode_server_frame(first.data), f.Challenge)
        closing = await ws.receive(timeout=5)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1001
        await ws.close()
        assert not draining.done()  # Alice's Send holds the drain
        release.set()
        sent = await asyncio.wait_for(sending, 10)  # answered: accepted, not NotSent
        assert sent.text == "in flight"
        assert await asyncio.wait_for(draining, 10) == 0  # every handler ended
        assert alice.transport.close_code == 1001  # and then she was told to go
    finally:
        release.set()
        await session.close()
        await alice.close()
        await bob.close()
