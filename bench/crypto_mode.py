"""pairs and paced with real end-to-end encryption: every device is a full KluisClient.

Each simulated device has its own encrypted profile (vodozemac Olm account, sealing key, SQLite
profile store); messages are Olm-encrypted, padded and sealed by the client exactly as the
``kluis`` command does, and the receiver decrypts them before its figure is taken. Latency is
from the (scheduled) send time to the return of ``receive()`` with the decrypted message, which
includes the receiver's acknowledgement round trip. Only the profile's argon2id parameters are
lowered (``time_cost=1, memory_kib=8192``) so that set-up takes seconds, not minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import MB, Sampler, Server, latency_fields, pct, send_time
from kluis.client.client import KluisClient
from kluis.client.core import ClientCore
from kluis.client.store import ProfileStore
from kluis.client.transport import Transport
from kluis.crypto.profile_key import new_params
from kluis.protocol import frames as f

PASSPHRASE = "bench passphrase"


async def make_client(server: Server, licence: str, profile: Path) -> KluisClient:
    """Create a profile with a fast KDF, redeem ``licence``, then log in as ``kluis`` would."""
    http = f"http://127.0.0.1:{server.port}"
    store = ProfileStore.create(profile, PASSPHRASE, new_params(time_cost=1, memory_kib=8192))
    core = ClientCore.create(store, http)
    transport = Transport(http)
    try:
        nonce = await transport.connect()
        welcome = await transport.request(
            lambda rid: f.Register(
                rid=rid, licence=licence, device=core.device_keys(), sig=core.sign_challenge(nonce)
            ),
            f.Welcome,
        )
        core.set_account(welcome.account)
    finally:
        await transport.close()
        store.close()
    client = KluisClient.open(profile, PASSPHRASE)
    await client.connect()  # Auth, then publishes one-time keys
    return client


async def crypto_pairs_workload(
    label: str, users: int, messages: int, rate: float = 0.0, deadline_s: float = 240.0
) -> dict[str, Any]:
    server = Server(licences=users)
    pid = server.start()
    sampler = Sampler(pid)
    sampler.start()
    # 50 devices share one disk here; each real device has its own. Profiles go to tmpfs when
    # there is one, so the clients' fsyncs do not queue behind each other (the server's data
    # stays on disk).
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tmp = Path(tempfile.mkdtemp(prefix="kluis-bench-profiles-", dir=shm))
    res_dir = str(shm or tempfile.gettempdir())
    clients: list[KluisClient] = []
    res: dict[str, Any] = {"label": label, "mode": "crypto (vodozemac)", "profiles_on": res_dir}
    try:
        res["server_rss_start_mb"] = sampler.rss() / MB
        t = time.perf_counter()
        sem = asyncio.Semaphore(10)

        async def one(i: int, code: str) -> KluisClient:
            async with sem:
                return await make_client(server, code, tmp / f"d{i}")

        clients = list(await asyncio.gather(*(one(i, c) for i, c in enumerate(server.licences))))
        res["register_s"] = time.perf_counter() - t
        pairs = [(clients[2 * i], clients[2 * i + 1]) for i in range(len(clients) // 2)]
        total = messages * len(pairs)
        latencies: list[float] = []
        send_lat: list[float] = []
        errors: dict[str, int] = {}
        stop = asyncio.Event()

        async def receiver(r: KluisClient) -> None:
            got = 0
            while got < messages and not stop.is_set():
                for m in await r.receive(wait=0.5, until=1):
                    now = time.perf_counter()
                    latencies.append(now - float(m.text.split(" ", 1)[0]))
                    got += 1

        t_send0 = time.perf_counter()
        interval = len(pairs) / rate if rate > 0 else 0.0

        async def sender(i: int, s: KluisClient, r: KluisClient) -> None:
            start = t_send0 + (i / len(pairs)) * interval
            for k in range(messages):
                t0 = await send_time(start, k, interval)
                text = f"{t0:.9f} {k} ".ljust(100, "x")
                try:
                    await s.send(r.account_id, text)
                    send_lat.append(time.perf_counter() - t0)
                except Exception as exc:  # counted, not fatal: the figure says how many
                    key = getattr(exc, "code", type(exc).__name__)
                    errors[key] = errors.get(key, 0) + 1

        rx = [asyncio.create_task(receiver(r)) for _, r in pairs]
        cpu0, me0 = sampler.cpu(), _own_cpu()
        timed_out = False
        try:
            await asyncio.wait_for(
                asyncio.gather(*(sender(i, s, r) for i, (s, r) in enumerate(pairs))), deadline_s
            )
        except TimeoutError:
            timed_out = True
        t_send1 = time.perf_counter()
        cpu1, me1 = sampler.cpu(), _own_cpu()
        try:
            await asyncio.wait_for(asyncio.gather(*rx), 30)
        except TimeoutError:
            res["drain_timed_out"] = True
        stop.set()
        for task in rx:
            task.cancel()
        await asyncio.gather(*rx, return_exceptions=True)
        t_recv1 = time.perf_counter()
        wall = t_send1 - t_send0
        send_lat.sort()
        res.update(
            {
                "users": users,
                "pairs": len(pairs),
                "messages_per_sender": messages,
                "target_rate_msg_s": rate or "max",
                "messages_sent": len(send_lat),
                "messages_received": len(latencies),
                "messages_received_decrypted": len(latencies),
                "messages_lost": len(send_lat) - len(latencies),
                "send_wall_s": wall,
                "send_throughput_msg_s": len(send_lat) / wall if wall else 0.0,
                "all_received_wall_s": t_recv1 - t_send0,
                "send_req_ms_p50": pct(send_lat, 50) * 1e3,
                "send_req_ms_p99": pct(send_lat, 99) * 1e3,
                **latency_fields(latencies),
                "server_cpu_pct_during_send": 100 * (cpu1 - cpu0) / wall if wall else 0.0,
                "client_cpu_pct_during_send": 100 * (me1 - me0) / wall if wall else 0.0,
                "errors": sum(errors.values()) + sum(len(c.errors) for c in clients),
                "error_codes": errors,
                "connections_held": (server.health() or {}).get("connections", 0),
                "server_rss_end_mb": sampler.rss() / MB,
                "expected_messages": total,
            }
        )
        if timed_out:
            res["send_phase_timed_out"] = True
        res["_latencies_ms"] = [x * 1e3 for x in latencies]
    finally:
        for c in clients:
            with contextlib.suppress(Exception):  # best effort at the end of a run
                await c.close()
        await sampler.stop()
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    res["server_rss_peak_mb"] = sampler.peak() / MB
    return res


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system
