"""Bad input: tampered and replayed envelopes, malformed, oversized and unauthenticated frames."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from kluis.errors import DecryptionError, FrameTooLarge, MismatchedDevices
from kluis.protocol import frames as f
from kluis.server.inprocess import InProcessServer
from tests.kluis_testing import RawConnection, ServerProcess, register


@pytest.fixture
async def raw(server: ServerProcess) -> AsyncIterator[RawConnection]:
    conn = await RawConnection.open(server)
    yield conn
    await conn.close()


async def expect_error(conn: RawConnection, code: str) -> f.Error:
    frame = await conn.recv()
    assert isinstance(frame, f.Error), frame
    assert frame.code == code, frame
    assert frame.message
    return frame


async def test_garbage_frame_gets_bad_frame_and_connection_survives(raw: RawConnection) -> None:
    await raw.send(b"\xff\x00garbage")
    await expect_error(raw, "bad_frame")
    await raw.send(f.encode(f.Ack(rid=7, ids=[1])))  # well-formed but not logged in
    err = await expect_error(raw, "unauthenticated")
    assert err.rid == 7
    await raw.ws.send_str("text frames are not the protocol")
    await expect_error(raw, "bad_frame")


async def test_schema_violation_is_bad_frame(raw: RawConnection) -> None:
    import msgspec

    await raw.send(msgspec.msgpack.encode({"t": "send", "rid": 1, "account": 5}))
    await expect_error(raw, "bad_frame")
    await raw.send(msgspec.msgpack.encode({"t": "no_such_frame", "rid": 1}))
    await expect_error(raw, "bad_frame")


async def test_bad_signature_and_unknown_device(
    raw: RawConnection, server: ServerProcess, tmp_path: Path
) -> None:
    """Before login, one answer for a bad signature and an unknown device (no oracle), and one
    attempt per connection; a correct signature on a new connection works."""
    alice = await register(server, tmp_path / "alice")
    await raw.send(f.encode(f.Auth(rid=1, device=alice.core.device_id, sig="A" * 86)))
    bad_sig = await expect_error(raw, "unknown_device")
    msg = await raw.ws.receive(timeout=5)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
    other = await RawConnection.open(server)
    await other.send(f.encode(f.Auth(rid=2, device="nobody", sig="A" * 86)))
    unknown = await expect_error(other, "unknown_device")
    assert unknown.message == bad_sig.message
    await other.close()
    again = await RawConnection.open(server)
    await again.send(
        f.encode(f.Auth(rid=3, device=alice.core.device_id, sig=again.login_sig(alice)))
    )
    welcome = await again.recv()
    assert isinstance(welcome, f.Welcome) and welcome.account == alice.account_id
    await again.close()
    await alice.close()


async def test_oversized_frame_typed_error_then_cut(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "server", "--max-frame-bytes", "65536")
    srv.start()
    try:
        alice = await register(srv, tmp_path / "alice")
        raw = await RawConnection.open(srv)  # logged in: the full frame limit applies
        auth = f.Auth(rid=1, device=alice.core.device_id, sig=raw.login_sig(alice))
        await raw.send(f.encode(auth))
        assert isinstance(await raw.recv(), f.Welcome)
        ws = raw.ws
        await ws.send_bytes(b"\x00" * 70_000)  # a little too large: typed error, still open
        frame = await raw.recv()
        assert isinstance(frame, f.Error) and frame.code == "frame_too_large"
        # Far too large (over 4 x the limit): the connection is cut. Just over, not 1 MB: the
        # server cuts after the frame header, and a write still running then fails (EPIPE).
        await ws.send_bytes(b"\x00" * 300_000)
        while (msg := await ws.receive(timeout=5)).type == aiohttp.WSMsgType.BINARY:
            pass  # pushes (Synced)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 1009
        await raw.close()
        await alice.close()
        # The server is still up for everyone else.
        async with aiohttp.ClientSession() as session, session.get(srv.url + "/health") as r:
            assert r.status == 200
    finally:
        srv.stop()


async def test_oversized_envelope_and_mismatched_devices(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    server = inproc  # joined in memory: this test needs no socket
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    big = f.OutEnvelope(device=bob.core.device_id, body=b"x" * (100 * 1024))
    with pytest.raises(FrameTooLarge):
        await alice.transport.request(lambda rid: f.Send.one(rid, bob.account_id, [big]), f.Done)
    wrong = f.OutEnvelope(device="not-a-device", body=b"x")
    with pytest.raises(MismatchedDevices) as info:
        await alice.transport.request(lambda rid: f.Send.one(rid, bob.account_id, [wrong]), f.Done)
    assert info.value.mismatched == [(bob.account_id, [bob.core.device_id], ["not-a-device"])]
    # Nothing was stored by the refused sends; a real message still goes through.
    await alice.send(bob.account_id, "still fine")
    assert [m.text for m in await bob.receive(wait=5, until=1)] == ["still fine"]
    await alice.close()
    await bob.close()


async def test_tampered_envelope_rejected_session_survives(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    server = inproc  # joined in memory: this test needs no socket
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    await alice.send(bob.account_id, "first")
    assert [m.text for m in await bob.receive(wait=5, until=1)] == ["first"]

    (env,) = await alice.encrypt(bob.account_id, alice.core.new_text(bob.account_id, "tampered"))
    body = bytearray(env.body)
    body[len(body) // 2] ^= 0x01
    bad = f.OutEnvelope(device=env.device, body=bytes(body))
    await alice.transport.request(lambda rid: f.Send.one(rid, bob.account_id, [bad]), f.Done)
    assert await bob.receive(wait=1) == []
    assert len(bob.errors) == 1 and isinstance(bob.errors[0], DecryptionError)
    assert "tampered" in str(bob.errors[0])

    # The session is intact in both directions.
    await alice.send(bob.account_id, "second")
    assert [m.text for m in await bob.receive(wait=5, until=1)] == ["second"]
    await bob.send(alice.account_id, "reply")
    assert [m.text for m in await alice.receive(wait=5, until=1)] == ["reply"]
    await alice.close()
    await bob.close()


async def test_replayed_envelope_shown_once(inproc: InProcessServer, tmp_path: Path) -> None:
    server = inproc  # joined in memory: this test needs no socket
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    (env,) = await alice.encrypt(bob.account_id, alice.core.new_text(bob.account_id, "only once"))
    for _ in range(3):  # the server (or anyone) delivers the same envelope three times
        await alice.transport.request(lambda rid: f.Send.one(rid, bob.account_id, [env]), f.Done)
    got = await bob.receive(wait=2, until=3)
    assert [m.text for m in got] == ["only once"]
    assert bob.errors == []
    # Replayed again later, after the first copy was acknowledged and deleted.
    await alice.transport.request(lambda rid: f.Send.one(rid, bob.account_id, [env]), f.Done)
    assert await bob.receive(wait=1) == []
    await alice.close()
    await bob.close()
