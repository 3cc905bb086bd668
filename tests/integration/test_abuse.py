"""Abuse limits on a live server: garbage, slow connections, key draining and mailbox flooding.

Each test shows one bound: the server answers garbage with typed errors and stays up; a client
that never completes its HTTP request or never authenticates is cut on a deadline, however it
dribbles; one-time-key claims are rate limited per device, across reconnections; a flooded
mailbox refuses further envelopes with ``quota_exceeded`` until its device drains it.
"""

from __future__ import annotations

import asyncio
import random
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest

from kluis.client.client import KluisClient
from kluis.errors import QuotaExceeded, RateLimited
from kluis.protocol import frames as f
from kluis.server.config import Limits
from tests.kluis_testing import PASSPHRASE, RawConnection, ServerProcess, fast_kdf, register

AUTH_TIMEOUT_S = 10.0  # Limits.auth_timeout_s and Limits.handshake_timeout_s
KNOWN_CODES = {
    "bad_frame",
    "frame_too_large",
    "unauthenticated",
    "bad_signature",
    "rate_limited",
    "quota_exceeded",
    "licence_invalid",
    "unknown_account",
    "unknown_device",
    "mismatched_devices",
    "link_invalid",
}


@pytest.fixture
async def client(server: ServerProcess, tmp_path: Path) -> AsyncIterator[KluisClient]:
    c = await register(server, tmp_path / "me")
    yield c
    await c.close()


def garbage(rng: random.Random, device: str, account: str) -> bytes:
    """One frame a real client would never send: random bytes, or a valid frame made wrong."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 200))
    valid = [
        f.Send.one(1, account, [f.OutEnvelope(device=device, body=b"x")]),
        f.ClaimKeys(rid=2, account=account, devices=[device]),
        f.Ack(rid=3, ids=[1, 2, 3]),
        f.ListDevices(rid=4, account=account),
        f.LinkFetch(rid=5, token="nope"),
        f.Revoke(rid=6, revocation=f.Revocation(device="not-a-device", sig="A" * 86)),
        f.UploadKeys(rid=7, one_time_keys=[f.SignedKey(key_id="k", key="k", sig="s")]),
    ]
    data = bytearray(f.encode(rng.choice(valid)))
    if kind == 1:  # truncated
        return bytes(data[: rng.randrange(len(data))])
    if kind == 2:  # bytes flipped
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 3:  # wrong types in the right places
        obj = msgspec.msgpack.decode(bytes(data))
        key = rng.choice(sorted(obj))
        obj[key] = rng.choice([None, -1, 2**64 - 1, "", b"\x00" * 70, [[]], {"a": 1}, 1.5])
        return msgspec.msgpack.encode(obj)
    if kind == 4:  # nested deeply
        nested: object = []
        for _ in range(rng.randrange(10, 500)):
            nested = [nested]
        return msgspec.msgpack.encode(nested)
    return bytes(data)  # a valid frame, as a stranger or at the wrong time


async def test_garbage_volley_gets_typed_errors_and_the_server_stays_up(
    server: ServerProcess, client: KluisClient, tmp_path: Path
) -> None:
    rng = random.Random(4)
    account, device = client.account_id, client.core.device_id
    peer = await register(server, tmp_path / "peer")
    await peer.close()
    strangers = [await RawConnection.open(server) for _ in range(2)]
    insider = await RawConnection.open(server)  # authenticated as a real device of its own account
    insider_client = KluisClient.open(tmp_path / "peer", PASSPHRASE)
    auth = f.Auth(
        rid=9,
        device=insider_client.core.device_id,
        sig=insider.login_sig(insider_client),
    )
    await insider.ws.send_bytes(f.encode(auth))
    assert isinstance(await insider.recv(), f.Welcome)

    codes: dict[str, int] = {}
    for _ in range(150):
        for raw in [*strangers, insider]:
            await raw.ws.send_bytes(garbage(rng, device, account))
            answer = await raw.recv()
            if isinstance(answer, f.Error):
                assert answer.code in KNOWN_CODES, answer  # never "internal"
                codes[answer.code] = codes.get(answer.code, 0) + 1
    assert {"bad_frame", "unauthenticated"} <= set(codes)
    for raw in [*strangers, insider]:
        await raw.close()
    insider_client.core.store.close()

    with urllib.request.urlopen(server.url + "/health", timeout=5) as r:
        assert r.status == 200
    await client.send(peer.account_id, "still works")  # and a real exchange still does
    assert "Traceback" not in server.log_path.read_text()


async def test_slow_and_silent_connections_are_cut(
    server: ServerProcess, client: KluisClient, tmp_path: Path
) -> None:
    """Slowloris: dribbled HTTP headers, a WebSocket that never signs, and one that sends a
    garbage frame every second to look busy; each is cut within the deadline."""
    start = time.monotonic()
    limit = AUTH_TIMEOUT_S + 5

    async def dribble_headers() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n")
        try:
            while time.monotonic() - start < limit:
                writer.write(b"X")  # a header that never ends
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(100), 1.0) == b"":
                        break
                except TimeoutError:
                    continue
        except ConnectionError:
            pass
        writer.close()
        return time.monotonic() - start

    async def silent_websocket() -> float:
        raw = await RawConnection.open(server)
        msg = await raw.ws.receive(timeout=limit)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
        await raw.close()
        return time.monotonic() - start

    async def busy_unauthenticated_websocket() -> float:
        raw = await RawConnection.open(server)
        try:
            while time.monotonic() - start < limit:
                await raw.ws.send_bytes(b"\xc1")  # never-valid msgpack: bad_frame, every second
                msg = await raw.ws.receive(timeout=2)
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                await asyncio.sleep(1)
        except (ConnectionError, aiohttp.ClientError):
            pass
        await raw.close()
        return time.monotonic() - start

    async def meanwhile_a_real_user() -> None:
        await asyncio.sleep(1)
        await client.send(client.account_id, "note to self")  # no other device: nothing sent

    times = await asyncio.gather(
        dribble_headers(), silent_websocket(), busy_unauthenticated_websocket()
    )
    await meanwhile_a_real_user()
    for took in times:
        assert AUTH_TIMEOUT_S - 1 < took < AUTH_TIMEOUT_S + 3, times


async def test_key_claims_are_rate_limited_per_device_across_reconnects(
    server: ServerProcess, client: KluisClient, tmp_path: Path
) -> None:
    victim = await register(server, tmp_path / "victim")
    victim_account, victim_device = victim.account_id, victim.core.device_id
    await victim.close()  # offline: nobody refills

    burst = Limits().claim_burst

    async def drain(c: KluisClient) -> tuple[int, bool]:
        claimed, saw_fallback = 0, False
        for _ in range(burst + 200):
            try:
                answer = await c.transport.request(
                    lambda rid: f.ClaimKeys(
                        rid=rid, account=victim_account, devices=[victim_device]
                    ),
                    f.Bundles,
                )
            except RateLimited:
                return claimed, saw_fallback
            claimed += 1
            saw_fallback |= answer.bundles[0].fallback
        return claimed, saw_fallback

    claimed, _ = await drain(client)
    drained_at = time.monotonic()
    assert 0 < claimed <= burst + 50  # the claim burst and a little refill
    # A new connection of the same device gets no fresh burst.
    await client.close()
    again = KluisClient.open(tmp_path / "me", PASSPHRASE)
    await again.connect()
    more, _ = await drain(again)
    refill = Limits().claim_rate_per_s * (time.monotonic() - drained_at)
    assert more <= refill + 2, (more, refill)
    await again.close()


async def test_mailbox_flooding_is_bounded_by_quota(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "server", "--mailbox-quota", "20")
    srv.start()
    try:
        alice = await register(srv, tmp_path / "alice")
        bob = await register(srv, tmp_path / "bob")
        await bob.close()  # offline: the mailbox fills
        for i in range(20):
            await alice.send(bob.account_id, f"flood {i}")
        with pytest.raises(QuotaExceeded) as info:
            await alice.send(bob.account_id, "one too many")
        assert info.value.code == "quota_exceeded"
        bob = KluisClient.open(tmp_path / "bob", PASSPHRASE)
        await bob.connect()
        assert len(await bob.receive()) == 20
        await alice.send(bob.account_id, "room again")  # drained: the quota frees up
        assert [m.text for m in await bob.receive(wait=5, until=1)] == ["room again"]
        await alice.close()
        await bob.close()
    finally:
        srv.stop()


async def test_pending_device_links_are_capped(tmp_path: Path) -> None:
    """A link request needs no account; each stores keys for 10 minutes. Capped, a flood of them
    cannot grow the database without bound (it can only delay other links)."""
    srv = ServerProcess(tmp_path / "server", "--limit", "max_pending_links=3")
    srv.start()
    try:
        for i in range(3):
            await KluisClient.request_link(
                srv.url, tmp_path / f"new{i}", PASSPHRASE, kdf=fast_kdf()
            )
        with pytest.raises(RateLimited):
            await KluisClient.request_link(
                srv.url, tmp_path / "one-more", PASSPHRASE, kdf=fast_kdf()
            )
    finally:
        srv.stop()
