"""pairs and paced with real end-to-end encryption: every device is a full KluisClient.

Each simulated device has its own encrypted profile (vodozemac Olm account, sealing key, SQLite
profile store); messages are Olm-encrypted, padded and sealed by the client exactly as the
``kluis`` command does, and the receiver decrypts them before its figure is taken. Latency is
from the (scheduled) send time to the return of ``receive()`` with the decrypted message, which
includes the receiver's acknowledgement round trip. Senders stay in this process; receivers run
in ``bench/crypto_receivers.py`` so that decryption does not queue behind encryption on one core.
Only the profile's argon2id parameters are
lowered (``time_cost=1, memory_kib=8192``) so that set-up takes seconds, not minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import MB, ROOT, Sampler, Server, latency_fields, pct, send_time
from kluis.client.client import KluisClient
from kluis.crypto.profile_key import new_params

PASSPHRASE = "bench passphrase"


async def make_client(server: Server, licence: str, profile: Path) -> KluisClient:
    """Create a profile with a fast KDF, redeem ``licence``, then log in as ``kluis`` would."""
    http = f"http://127.0.0.1:{server.port}"
    fast = new_params(time_cost=1, memory_kib=8192)
    await (await KluisClient.register(http, licence, profile, PASSPHRASE, kdf=fast)).close()
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
        # receivers run in their own process (bench/crypto_receivers.py): the parent keeps the
        # senders, the child reopens the receivers' profiles
        senders = clients[0::2]
        receivers = clients[1::2]
        rx_accounts = [r.account_id for r in receivers]
        for r in receivers:
            await r.close()
        clients = senders
        pairs = list(zip(senders, rx_accounts, strict=True))
        listing = tmp / "receivers.json"
        listing.write_text(json.dumps([str(tmp / f"d{2 * i + 1}") for i in range(len(pairs))]))
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.crypto_receivers",
            "--profiles",
            str(listing),
            "--messages",
            str(messages),
            "--deadline",
            str(deadline_s + 30),
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            limit=1 << 24,  # the LATENCIES line holds every figure
        )
        assert child.stdout is not None
        ready = await asyncio.wait_for(child.stdout.readline(), 120)
        if not ready.startswith(b"READY"):
            raise RuntimeError(f"receiver process failed: {ready!r}")
        rx_proc = psutil.Process(child.pid)
        held = server.connections_held()
        total = messages * len(pairs)
        send_lat: list[float] = []
        errors: dict[str, int] = {}

        t_send0 = time.perf_counter()
        interval = len(pairs) / rate if rate > 0 else 0.0

        async def sender(i: int, s: KluisClient, peer: str) -> None:
            start = t_send0 + (i / len(pairs)) * interval
            for k in range(messages):
                t0 = await send_time(start, k, interval)
                text = f"{t0:.9f} {k} ".ljust(100, "x")
                try:
                    await s.send(peer, text)
                    send_lat.append(time.perf_counter() - t0)
                except Exception as exc:  # counted, not fatal: the figure says how many
                    key = getattr(exc, "code", type(exc).__name__)
                    errors[key] = errors.get(key, 0) + 1

        cpu0, me0, rx0 = sampler.cpu(), _own_cpu(), _proc_cpu(rx_proc)
        timed_out = False
        try:
            await asyncio.wait_for(
                asyncio.gather(*(sender(i, s, r) for i, (s, r) in enumerate(pairs))), deadline_s
            )
        except TimeoutError:
            timed_out = True
        t_send1 = time.perf_counter()
        cpu1, me1, rx1 = sampler.cpu(), _own_cpu(), _proc_cpu(rx_proc)
        latencies: list[float] = []
        rx_errors = 0
        try:
            async with asyncio.timeout(deadline_s + 60):
                async for line in child.stdout:
                    if line.startswith(b"LATENCIES "):
                        latencies = json.loads(line[len(b"LATENCIES ") :])
                    elif line.startswith(b"ERRORS "):
                        rx_errors = int(json.loads(line[len(b"ERRORS ") :]))
                        break
        except TimeoutError:
            res["drain_timed_out"] = True
        t_recv1 = time.perf_counter()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(child.wait(), 30)
        if child.returncode is None:
            child.kill()
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
                "receiver_process_cpu_pct_during_send": 100 * (rx1 - rx0) / wall if wall else 0.0,
                "errors": sum(errors.values()) + sum(len(c.errors) for c in clients) + rx_errors,
                "error_codes": errors,
                "connections_held": held,
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


def _proc_cpu(proc: psutil.Process) -> float:
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system
