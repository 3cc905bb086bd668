"""Regression tests for the server findings of the adversarial review (issue 7), as an attacker
would meet them: a live server on loopback, hand-made frames and raw sockets.

Each test is named after its finding and fails on c4b3566. Findings 2, 5, 9, 10, 13, 14, 15.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import statistics
import struct
import time
import urllib.request
from pathlib import Path

import aiohttp
import msgspec
import pytest

from kluis.client.client import KluisClient
from kluis.client.core import ClientCore
from kluis.client.store import ProfileStore
from kluis.errors import QuotaExceeded
from kluis.protocol import frames as f
from kluis.server.config import Limits
from kluis.server.delivery.memory import InProcessBus
from kluis.server.mailbox import Mailbox
from kluis.server.ratelimit import BucketMap, LogLimiter
from kluis.server.store.sqlite import SqliteStore
from tests.kluis_testing import (
    PASSPHRASE,
    RawConnection,
    ServerProcess,
    fast_kdf,
    link_device,
    register,
    start_inprocess,
    transport_factory,
)

ENVELOPE = 96 * 1024  # Limits.max_envelope_bytes


def started(tmp_path: Path, *limits: str) -> ServerProcess:
    args: list[str] = []
    for limit in limits:
        args += ["--limit", limit]
    srv = ServerProcess(tmp_path / "server", *args)
    srv.start()
    return srv


async def login(server: ServerProcess, client: KluisClient) -> RawConnection:
    """A raw connection authenticated as ``client``'s device."""
    raw = await RawConnection.open(server)
    auth = f.Auth(
        rid=0, device=client.core.device_id, sig=client.core.sign_challenge(raw.nonce, raw.server)
    )
    await raw.send(f.encode(auth))
    welcome = await raw.recv()
    assert isinstance(welcome, f.Welcome), welcome
    return raw


async def closed(raw: RawConnection, timeout: float = 5) -> bool:
    """True once the server closes the connection (pushes before that are skipped)."""
    while True:
        msg = await raw.ws.receive(timeout=timeout)
        if msg.type != aiohttp.WSMsgType.BINARY:
            return msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
            )


async def ws_handshake(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket upgrade by hand, on a raw socket that then does whatever the test wants."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert b" 101 " in head, head
    return reader, writer


async def read_until_eof(reader: asyncio.StreamReader, timeout: float) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            data += chunk
    return data


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ---- finding 2 (and 10): a large backlog ------------------------------------------------------


async def test_finding2_large_backlog_is_delivered_in_bounded_frames(tmp_path: Path) -> None:
    """100 MB waiting for an offline device: delivered completely, in Deliver frames of at most
    ``max_deliver_bytes``, read from the database page by page (the server's memory does not
    grow by the backlog), while another user's sends stay fast."""
    cap = 1024 * 1024  # Limits.max_deliver_bytes
    srv = started(tmp_path, "send_burst=100000", "send_rate_per_s=100000")
    try:
        sender, recipient, alice, bob = [
            await register(srv, tmp_path / name) for name in ("sender", "recipient", "a", "b")
        ]
        for c in (sender, recipient, alice, bob):
            await c.close()
        body = os.urandom(ENVELOPE)  # junk: the server cannot tell
        count = -(-100_000_000 // ENVELOPE)
        out = await login(srv, sender)
        to_recipient = f.OutEnvelope(device=recipient.core.device_id, body=body)
        for start in range(0, count, 32):  # 32 sends in flight at a time
            window = range(start, min(count, start + 32))
            for rid in window:
                send = f.Send.one(rid, recipient.account_id, [to_recipient])
                await out.send(f.encode(send))
            for _ in window:
                assert isinstance(await out.recv(), f.Done)
        await out.close()
        assert srv.proc is not None
        rss_before = rss_mib(srv.proc.pid)

        probe = await login(srv, alice)
        note = f.OutEnvelope(device=bob.core.device_id, body=b"x" * 200)
        latencies: list[float] = []
        done = asyncio.Event()

        async def other_user() -> None:  # sends and times each answer
            rid = 0
            while not done.is_set():
                rid += 1
                t0 = time.perf_counter()
                await probe.send(f.encode(f.Send.one(rid, bob.account_id, [note])))
                assert isinstance(await probe.recv(), f.Done)
                latencies.append(time.perf_counter() - t0)
                await asyncio.sleep(0.005)

        rss_peak = rss_before

        async def watch_memory() -> None:
            nonlocal rss_peak
            assert srv.proc is not None
            while not done.is_set():
                rss_peak = max(rss_peak, rss_mib(srv.proc.pid))
                await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(other_user()), asyncio.create_task(watch_memory())]
        await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        inbox = await login(srv, recipient)
        ids: list[int] = []
        received = biggest = frames = 0
        while True:
            msg = await inbox.ws.receive(timeout=30)
            assert msg.type == aiohttp.WSMsgType.BINARY, msg
            frame = f.decode_server_frame(msg.data)
            if isinstance(frame, f.Synced):
                break
            if isinstance(frame, f.Done):
                continue  # the answer to an Ack
            assert isinstance(frame, f.Deliver), frame
            frames += 1
            biggest = max(biggest, len(msg.data))
            ids += [e.id for e in frame.envelopes]
            received += sum(len(e.body) for e in frame.envelopes)
            await inbox.send(f.encode(f.Ack(rid=frames, ids=[e.id for e in frame.envelopes])))
        took = time.perf_counter() - t0
        done.set()
        await asyncio.gather(*tasks)
        await inbox.close()
        await probe.close()

        lat = sorted(latencies)
        p50, p99 = statistics.median(lat), lat[int(0.99 * (len(lat) - 1))]
        print(
            f"\nbacklog {received / 1e6:.1f} MB in {frames} Deliver frames (largest {biggest} B, "
            f"cap {cap} B) in {took:.2f} s; meanwhile {len(lat)} sends by another user: "
            f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms; "
            f"server RSS {rss_before:.0f} MiB before, {rss_peak:.0f} MiB peak"
        )
        assert len(ids) == count and len(set(ids)) == count  # complete, nothing twice
        assert ids == sorted(ids)  # in order
        assert received == count * ENVELOPE >= 100_000_000
        assert biggest <= cap
        assert len(lat) >= 10
        assert p99 < 1.0  # very loose: the whole backlog read at once stalled everyone 1.5 s
        assert rss_peak - rss_before < 60  # pages, not the backlog (about 95 MiB), in memory
    finally:
        srv.stop()


async def test_finding2_envelope_larger_than_the_deliver_cap_goes_alone(tmp_path: Path) -> None:
    srv = started(tmp_path, "max_deliver_bytes=40000")
    try:
        sender = await register(srv, tmp_path / "sender")
        recipient = await register(srv, tmp_path / "recipient")
        await recipient.close()
        out = await login(srv, sender)
        for rid, size in enumerate([30_000, 30_000, 60_000, 10_000, 10_000]):
            env = f.OutEnvelope(device=recipient.core.device_id, body=b"z" * size)
            await out.send(f.encode(f.Send.one(rid, recipient.account_id, [env])))
            assert isinstance(await out.recv(), f.Done)
        inbox = await login(srv, recipient)
        sizes: list[list[int]] = []
        while not isinstance(
            frame := f.decode_server_frame((await inbox.ws.receive(5)).data), f.Synced
        ):
            assert isinstance(frame, f.Deliver)
            sizes.append([len(e.body) for e in frame.envelopes])
        assert sizes == [[30_000], [30_000], [60_000], [10_000, 10_000]]
        await inbox.close()
        await out.close()
        await sender.close()
    finally:
        srv.stop()


async def test_finding10_mailbox_bytes_are_capped_per_device(tmp_path: Path) -> None:
    srv = await start_inprocess(  # joined in memory: the rule needs no socket
        tmp_path / "server", Limits(mailbox_quota_bytes=3 * ENVELOPE)
    )
    try:
        sender = await register(srv, tmp_path / "sender")
        recipient = await register(srv, tmp_path / "recipient")
        await recipient.close()
        env = f.OutEnvelope(device=recipient.core.device_id, body=b"q" * ENVELOPE)
        with pytest.raises(QuotaExceeded):
            for _ in range(4):
                await sender.transport.request(
                    lambda rid: f.Send.one(rid, recipient.account_id, [env]),
                    f.Done,
                )
        await sender.close()
    finally:
        await srv.close()


# ---- finding 5: integers out of range, and one failure failing a whole group commit ----------


async def test_finding5_huge_ack_ids_fail_alone_without_tracebacks(
    server: ServerProcess, tmp_path: Path
) -> None:
    mallory, alice, bob = [await register(server, tmp_path / n) for n in ("m", "a", "b")]
    for c in (mallory, alice, bob):
        await c.close()
    bad = await login(server, mallory)
    good = await login(server, alice)
    note = f.OutEnvelope(device=bob.core.device_id, body=b"hello")
    failures = 0
    for rid in range(300):
        await bad.send(msgspec.msgpack.encode({"t": "ack", "rid": rid, "ids": [2**63 + rid]}))
        await good.send(f.encode(f.Send.one(rid, bob.account_id, [note])))
        answer = await bad.recv()
        assert isinstance(answer, f.Error) and answer.code == "bad_frame", answer
        if not isinstance(await good.recv(), f.Done):
            failures += 1
    assert failures == 0
    # Every list in a frame is bounded too.
    await bad.send(f.encode(f.Ack(rid=1, ids=list(range(1, f.MAX_ACK_IDS + 2)))))
    answer = await bad.recv()
    assert isinstance(answer, f.Error) and answer.code == "bad_frame"
    await bad.close()
    await good.close()
    server.stop()
    log = server.log_path.read_text()
    assert "Traceback" not in log and "request failed" not in log


async def test_finding5_one_failing_request_does_not_fail_its_group_commit(
    tmp_path: Path,
) -> None:
    """In-process: a request the database refuses fails alone; the others in its transaction
    are committed again without it, and answered."""
    store = SqliteStore(tmp_path / "db.sqlite3")
    mailbox = Mailbox(store, Limits(), time.time, InProcessBus())
    real_delete = store.db.delete_envelopes

    def delete(rows):  # type: ignore[no-untyped-def]
        if any(device == "bad" for device, _ in rows):
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return real_delete(rows)

    store.db.delete_envelopes = delete  # type: ignore[method-assign]
    await mailbox.deposit([("dev", b"zero")])  # the device's count is known: no read below
    results = await asyncio.gather(
        mailbox.deposit([("dev", b"one")]),
        mailbox.acknowledge("bad", [1]),
        mailbox.acknowledge("other", [1]),
        return_exceptions=True,
    )
    assert isinstance(results[0], list) and len(results[0]) == 1  # committed, and answered
    assert isinstance(results[1], OverflowError)
    assert results[2] is None
    assert await store.count_envelopes("dev") == 2
    await store.close()


def test_finding5_failures_log_one_line_per_second_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    limiter = LogLimiter(logging.getLogger("kluis.server"), lambda: now[0])
    with caplog.at_level(logging.ERROR, logger="kluis.server"):
        for i in range(1000):
            now[0] = i / 100  # 1000 failures in 10 s
            limiter.error("a request failed", OverflowError("secret frame bytes"))
    assert 9 <= len(caplog.records) <= 11
    assert all(r.exc_info is None for r in caplog.records)
    assert "secret" not in caplog.text and "OverflowError" in caplog.text
    assert "99 more" in caplog.records[-1].getMessage()


def test_finding5_rate_limit_buckets_are_pruned() -> None:
    now = [0.0]
    buckets = BucketMap(1.0, 5, lambda: now[0])
    for i in range(10_000):
        buckets.get(f"device{i}").take()
    assert len(buckets) == 10_000
    now[0] = BucketMap.PRUNE_EVERY_S + 1  # all refilled: as good as new
    buckets.get("one more").take()
    assert len(buckets) == 1


# ---- finding 9: unauthenticated CPU amplification --------------------------------------------


def new_device(tmp_path: Path, name: str, server: ServerProcess) -> ClientCore:
    store = ProfileStore.create(tmp_path / name, PASSPHRASE, fast_kdf())
    return ClientCore.create(
        store, server.url, clock=time.time, random=secrets.token_bytes, new_account=True
    )


async def test_finding9_one_login_attempt_per_connection_and_cheap_checks_first(
    server: ServerProcess, tmp_path: Path
) -> None:
    core = new_device(tmp_path, "new", server)
    otks, fallback = core.keys_to_upload(0)
    assert otks
    # A link request whose last key signature is bad: refused, and the connection is closed,
    # so the same frame cannot be replayed to make the server verify it again.
    raw = await RawConnection.open(server)
    forged = [*otks[:-1], msgspec.structs.replace(otks[-1], sig=otks[0].sig)]
    request = f.LinkRequest(
        rid=1,
        device=core.device_keys(),
        sig=core.sign_challenge(raw.nonce, raw.server),
        one_time_keys=forged,
        fallback_key=fallback,
    )
    await raw.send(f.encode(request))
    answer = await raw.recv()
    assert isinstance(answer, f.Error) and answer.code == "bad_signature"
    assert await closed(raw)
    await raw.close()
    # Caps before signatures: too many keys is refused without checking any signature.
    raw = await RawConnection.open(server)
    too_many = [
        msgspec.structs.replace(otks[0], key_id=f"k{i}", sig="A" * 86)
        for i in range(Limits().max_keys_per_upload + 1)
    ]
    bogus = f.LinkRequest(rid=2, device=core.device_keys(), sig="A" * 86, one_time_keys=too_many)
    await raw.send(f.encode(bogus))
    answer = await raw.recv()
    assert isinstance(answer, f.Error) and answer.code == "quota_exceeded", answer
    assert await closed(raw)
    await raw.close()
    # Licence guesses: one per connection.
    raw = await RawConnection.open(server)
    for rid in (3, 4):
        guess = f.Register(
            rid=rid,
            licence="AAAA-BBBB",
            identity=core.identity_key,
            device=core.own_record(),
            sig=core.sign_challenge(raw.nonce, raw.server),
        )
        with contextlib.suppress(ConnectionError, aiohttp.ClientError):
            await raw.send(f.encode(guess))
        if rid == 3:
            answer = await raw.recv()
            assert isinstance(answer, f.Error) and answer.code == "licence_invalid"
    assert await closed(raw)
    await raw.close()
    core.store.close()


# ---- finding 10: memory and time held by unauthenticated connections ------------------------


async def test_finding10_unfinished_prelogin_frame_is_cut_at_the_budget(tmp_path: Path) -> None:
    """A 1 MiB frame started before login: the server stops at ``max_prelogin_bytes`` and
    closes with 1009, instead of buffering it until the auth deadline."""
    srv = started(tmp_path, "auth_timeout_s=8")
    try:
        conns = [await ws_handshake(srv.port) for _ in range(20)]
        t0 = time.monotonic()
        header = struct.pack("!BBQ", 0x82, 0x80 | 127, 1 << 20) + b"\x00\x00\x00\x00"  # masked
        for _, writer in conns:
            writer.write(header)
        for _ in range(8):  # 64 KiB each, in 8 KiB pieces
            for _, writer in conns:
                with contextlib.suppress(ConnectionError):
                    writer.write(bytes(8192))
                    await writer.drain()
        for reader, writer in conns:
            # Closed: with the close frame's code, unless the reset for the bytes the server
            # never read overtook it.
            data = await read_until_eof(reader, timeout=5)
            assert not data or struct.pack("!H", 1009) in data, data[-40:]
            writer.close()
        assert time.monotonic() - t0 < 4  # not held until the 8 s deadline
        # A logged-in client still sends frames up to the full limit.
        alice = await register(srv, tmp_path / "alice")
        bob = await register(srv, tmp_path / "bob")
        await alice.send(bob.account_id, "y" * 60_000)
        assert [len(m.text) for m in await bob.receive(wait=5, until=1)] == [60_000]
        await alice.close()
        await bob.close()
    finally:
        srv.stop()


async def test_finding10_idle_unauthenticated_socket_is_cut_at_the_deadline(
    tmp_path: Path,
) -> None:
    """A socket that upgrades and then never answers anything, not even the close frame, is
    gone at ``auth_timeout_s`` (it lasted another 10 s waiting for the close answer)."""
    srv = started(tmp_path, "auth_timeout_s=2")
    try:
        reader, writer = await ws_handshake(srv.port)
        t0 = time.monotonic()
        await read_until_eof(reader, timeout=20)
        took = time.monotonic() - t0
        writer.close()
        assert 1.5 < took < 3.0, took
    finally:
        srv.stop()


async def test_finding10_devices_per_account_are_capped(tmp_path: Path) -> None:
    srv = await start_inprocess(  # joined in memory: the rule needs no socket
        tmp_path / "server", Limits(max_devices_per_account=2)
    )
    try:
        alice = await register(srv, tmp_path / "alice")
        second = await link_device(alice, srv, tmp_path / "alice2")
        code = await KluisClient.request_link(
            srv.url,
            tmp_path / "alice3",
            PASSPHRASE,
            transport_factory=transport_factory(srv),
            kdf=fast_kdf(),
        )
        with pytest.raises(QuotaExceeded):
            await alice.approve(code)
        await second.revoke(second.core.device_id)  # room again once one goes
        await second.close()
        await alice.approve(code)
        await alice.close()
    finally:
        await srv.close()


# ---- finding 13: client addresses in library log lines ---------------------------------------


async def test_finding13_malformed_http_logs_no_address_and_no_traceback(
    server: ServerProcess,
) -> None:
    requests = [
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /\x00\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\n\x00secret-echo\r\n\r\n",
    ]
    for data in requests:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            await asyncio.wait_for(reader.read(1000), 5)
        writer.close()
    server.stop()
    log = server.log_path.read_text()
    assert "listening on" in log
    body = [line for line in log.splitlines() if "listening on" not in line]
    assert not any("127.0.0.1" in line for line in body), log
    assert "Traceback" not in log and "secret-echo" not in log, log


# ---- finding 14: one device drains a victim's one-time keys ----------------------------------


async def test_finding14_claims_cannot_drain_a_victims_one_time_keys(
    server: ServerProcess, tmp_path: Path
) -> None:
    victim = await register(server, tmp_path / "victim")
    await victim.close()  # offline: nobody refills
    published = await login_count(server, victim)
    assert published >= 25
    burst = 10  # Limits.claim_target_burst
    one_time = 0
    for name in ("mallory", "mallory2"):  # two claimers: the budget is per target, not claimer
        attacker = await register(server, tmp_path / name)
        for _ in range(30):
            answer = await attacker.transport.request(
                lambda rid: f.ClaimKeys(
                    rid=rid, account=victim.account_id, devices=[victim.core.device_id]
                ),
                f.Bundles,
            )
            one_time += not answer.bundles[0].fallback
        await attacker.close()
    assert one_time <= burst + 1  # the budget, and a little refill
    left = await login_count(server, victim)
    assert left == published - one_time and left > 0, (published, left)


async def login_count(server: ServerProcess, client: KluisClient) -> int:
    raw = await RawConnection.open(server)
    auth = f.Auth(
        rid=0, device=client.core.device_id, sig=client.core.sign_challenge(raw.nonce, raw.server)
    )
    await raw.send(f.encode(auth))
    welcome = await raw.recv()
    await raw.close()
    assert isinstance(welcome, f.Welcome)
    return welcome.otk_count


# ---- finding 15: what the server tells strangers ---------------------------------------------


async def test_finding15_health_says_only_ok(server: ServerProcess, tmp_path: Path) -> None:
    alice = await register(server, tmp_path / "alice")
    with urllib.request.urlopen(server.url + "/health", timeout=5) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    await alice.close()


async def test_finding15_auth_answers_alike_for_unknown_revoked_and_known_devices(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = await register(server, tmp_path / "alice")
    gone = await link_device(alice, server, tmp_path / "alice2")
    await alice.revoke(gone.core.device_id)
    answers: list[tuple[str, str]] = []
    for device, signer in [
        ("n" * 43, None),  # unknown
        (gone.core.device_id, gone),  # revoked, correctly signed
        (alice.core.device_id, None),  # known, bad signature
    ]:
        raw = await RawConnection.open(server)
        sig = signer.core.sign_challenge(raw.nonce, raw.server) if signer else "A" * 86
        await raw.send(f.encode(f.Auth(rid=1, device=device, sig=sig)))
        answer = await raw.recv()
        assert isinstance(answer, f.Error)
        answers.append((answer.code, answer.message))
        await raw.close()
    assert len(set(answers)) == 1, answers
    await gone.close()
    await alice.close()
