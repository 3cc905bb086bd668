"""The client's WebSocket transport against a hand-made server on loopback that misbehaves: every
failure is a typed Kluis error (never a library exception), waiting requests are failed rather
than left hanging, and the server's close code reaches the client (1001: go elsewhere)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from kluis.client.transport.websocket import WebSocketTransport, ws_url
from kluis.errors import KluisError, MalformedFrame, TransportError
from kluis.protocol import frames as f

Script = Callable[[web.WebSocketResponse], Awaitable[None]]
CHALLENGE = f.encode(f.Challenge(nonce=b"n" * 32, server="http://127.0.0.1"))


@pytest.fixture
async def hostile() -> AsyncIterator[Callable[[Script], Awaitable[str]]]:
    """Start a server that sends the challenge, then plays ``script``; its base URL."""
    runners: list[web.AppRunner] = []

    async def start(script: Script) -> str:
        async def handler(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse(max_msg_size=8 * 1024 * 1024)
            await ws.prepare(request)
            await script(ws)
            return ws

        app = web.Application()
        app.router.add_get("/v1/ws", handler)
        runner = web.AppRunner(app, shutdown_timeout=0.2)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def _answer_nothing(ws: web.WebSocketResponse) -> None:
    await ws.send_bytes(CHALLENGE)
    async for _ in ws:
        pass


def test_urls() -> None:
    assert ws_url("http://h:1") == "ws://h:1/v1/ws"
    assert ws_url("https://h/") == "wss://h/v1/ws"
    assert ws_url("https://h/v1/ws") == "wss://h/v1/ws"


async def test_a_challenge_then_an_answer_and_a_push(
    hostile: Callable[[Script], Awaitable[str]],
) -> None:
    async def script(ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(CHALLENGE)
        async for msg in ws:
            frame = f.decode_client_frame(msg.data)
            await ws.send_bytes(f.encode(f.KeysLow(otk_count=3)))
            await ws.send_bytes(f.encode(f.Done(rid=frame.rid)))

    transport = WebSocketTransport(await hostile(script), timeout=5)
    assert await transport.connect() == b"n" * 32
    assert transport.server_origin == "http://127.0.0.1"
    done = await transport.request(lambda rid: f.Ack(rid=rid, ids=[]), f.Done)
    assert isinstance(done, f.Done)
    assert isinstance(transport.pushes.get_nowait(), f.KeysLow)
    await transport.close()
    await transport.close()  # idempotent


@pytest.mark.parametrize(
    ("first", "error"),
    [
        ("text", MalformedFrame),  # a text frame instead of the challenge
        (b"\xff\x00garbage", MalformedFrame),
        (f.encode(f.Done(rid=1)), MalformedFrame),  # a frame, but not a challenge
        ("close", TransportError),  # closed before the challenge
    ],
)
async def test_a_bad_start_is_a_typed_error(
    hostile: Callable[[Script], Awaitable[str]], first: str | bytes, error: type[KluisError]
) -> None:
    async def script(ws: web.WebSocketResponse) -> None:
        if first == "close":
            await ws.close()
        elif isinstance(first, str):
            await ws.send_str(first)
        else:
            await ws.send_bytes(first)
        await asyncio.sleep(1)

    transport = WebSocketTransport(await hostile(script), timeout=5)
    with pytest.raises(error):
        await transport.connect()
    await transport.close()


async def test_a_silent_server_and_a_closed_port_end_within_the_timeout(
    hostile: Callable[[Script], Awaitable[str]],
) -> None:
    async def silent(ws: web.WebSocketResponse) -> None:
        await asyncio.sleep(5)

    transport = WebSocketTransport(await hostile(silent), timeout=0.5)
    with pytest.raises(TransportError, match=r"within 0\.5 s"):
        await transport.connect()
    transport = WebSocketTransport(await hostile(_answer_nothing), timeout=0.5)
    await transport.connect()
    with pytest.raises(TransportError, match=r"no answer from the server within 0\.5 s"):
        await transport.request(lambda rid: f.Ack(rid=rid, ids=[]), f.Done)
    await transport.close()
    with pytest.raises(TransportError, match="cannot connect"):
        await WebSocketTransport("http://127.0.0.1:1", timeout=2).connect()


async def test_an_oversized_or_text_frame_fails_the_waiting_request(
    hostile: Callable[[Script], Awaitable[str]],
) -> None:
    for junk in (b"x" * 2048, "text"):

        async def script(ws: web.WebSocketResponse, junk: bytes | str = junk) -> None:
            await ws.send_bytes(CHALLENGE)
            await ws.receive()
            if isinstance(junk, bytes):
                await ws.send_bytes(junk)
            else:
                await ws.send_str(junk)
            await asyncio.sleep(2)

        transport = WebSocketTransport(await hostile(script), timeout=5, max_frame_bytes=1024)
        await transport.connect()
        with pytest.raises(KluisError) as caught:
            await transport.request(lambda rid: f.Ack(rid=rid, ids=[]), f.Done)
        assert isinstance(caught.value, TransportError | MalformedFrame)
        assert transport.close_code is None  # we ended it: not the server's word
        assert await asyncio.wait_for(transport.pushes.get(), 5) is None
        await transport.close()


async def test_the_servers_close_code_reaches_the_client(
    hostile: Callable[[Script], Awaitable[str]],
) -> None:
    async def going_away(ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(CHALLENGE)
        await ws.receive()
        await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY)

    transport = WebSocketTransport(await hostile(going_away), timeout=5)
    await transport.connect()
    with pytest.raises(TransportError) as caught:
        await transport.request(lambda rid: f.Ack(rid=rid, ids=[]), f.Done)
    assert caught.value.details.get("close_code") == 1001
    assert transport.close_code == 1001
    with pytest.raises(TransportError) as again:  # and a request after it says the same
        await transport.request(lambda rid: f.Ack(rid=rid, ids=[]), f.Done)
    assert again.value.details.get("close_code") == 1001
    await transport.close()


async def test_a_heartbeat_leaves_a_server_that_stops_answering(
    hostile: Callable[[Script], Awaitable[str]],
) -> None:
    async def hung(ws: web.WebSocketResponse) -> None:
        await ws.send_bytes(CHALLENGE)
        ws._autoping = False  # pings go unanswered, as from a stopped process
        await asyncio.sleep(10)

    transport = WebSocketTransport(await hostile(hung), timeout=30, heartbeat=0.4)
    await transport.connect()
    assert await asyncio.wait_for(transport.pushes.get(), 8) is None  # the channel ended
    assert transport.close_code is None
    with pytest.raises(TransportError):
        await transport.request(lambda rid: f.Ack(rid=rid, ids=[]), f.Done)
    await transport.close()
