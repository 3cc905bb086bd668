"""The four workloads of issue 3, in ``--no-crypto`` mode (real protocol, opaque bodies).

- pairs: ``users`` accounts in pairs; each sender sends ``messages`` back to back, one in flight;
- paced: the same at ``rate`` messages/s over all senders, latency from the scheduled send time
  (no coordinated omission);
- idle: N authenticated devices held open by child processes over several 127.0.0.x addresses,
  then the pairs workload runs on top of them (throughput with N devices connected);
- burst: 10,000 envelopes queued for offline devices, then they all connect and drain.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import MB, ROOT, Sampler, Server, latency_fields, send_time
from bench.device import Device, body, stamp
from kluis.protocol import frames as f


async def register_all(
    server: Server, licences: list[str], concurrency: int = 50, on_deliver: Any = None
) -> list[Device]:
    sem = asyncio.Semaphore(concurrency)

    async def one(code: str) -> Device:
        async with sem:
            d = Device(on_deliver=on_deliver)
            await d.register(server.url, code)
            return d

    return list(await asyncio.gather(*(one(c) for c in licences)))


async def run_pairs(
    server: Server,
    sampler: Sampler,
    devices: list[Device],
    messages: int,
    rate: float = 0.0,
    drain_s: float = 30.0,
    deadline_s: float = 240.0,
) -> dict[str, Any]:
    """Drive registered ``devices`` (sender, receiver, sender, receiver, ...); return figures."""
    pairs = [(devices[2 * i], devices[2 * i + 1]) for i in range(len(devices) // 2)]
    latencies: list[float] = []
    total = messages * len(pairs)
    all_in = asyncio.get_running_loop().create_future()

    def on_deliver(_d: Device, envs: list[f.InEnvelope], now: float) -> None:
        for e in envs:
            latencies.append(now - stamp(e.body)[0])
        if len(latencies) >= total and not all_in.done():
            all_in.set_result(None)

    for _, r in pairs:
        r.on_deliver = on_deliver
    send_lat: list[float] = []
    errors = [0]
    t_send0 = time.perf_counter()
    interval = len(pairs) / rate if rate > 0 else 0.0

    async def sender(i: int, s: Device, r: Device) -> None:
        start = t_send0 + (i / len(pairs)) * interval
        for k in range(messages):
            t0 = await send_time(start, k, interval)
            reply = await s.send(r.account, r.device_id, body(t0, k))
            if isinstance(reply, f.Error):
                errors[0] += 1
            else:
                send_lat.append(time.perf_counter() - t0)

    cpu0 = sampler.cpu()
    me0 = _own_cpu()
    busy0 = _machine_busy()
    timed_out = False
    try:
        await asyncio.wait_for(
            asyncio.gather(*(sender(i, s, r) for i, (s, r) in enumerate(pairs))),
            timeout=deadline_s,
        )
    except TimeoutError:
        timed_out = True
    t_send1 = time.perf_counter()
    cpu1, me1, busy1 = sampler.cpu(), _own_cpu(), _machine_busy()
    drain_timed_out = False
    try:
        await asyncio.wait_for(all_in, drain_s)
    except TimeoutError:
        drain_timed_out = True
    t_recv1 = time.perf_counter()
    wall = t_send1 - t_send0
    sent = len(send_lat)
    send_lat.sort()
    out: dict[str, Any] = {
        "users": len(devices),
        "pairs": len(pairs),
        "messages_per_sender": messages,
        "target_rate_msg_s": rate or "max",
        "messages_sent": sent,
        "messages_received": len(latencies),
        "messages_lost": sent - len(latencies),
        "send_wall_s": wall,
        "send_throughput_msg_s": sent / wall if wall else 0.0,
        "all_received_wall_s": t_recv1 - t_send0,
        "send_req_ms_p50": _p(send_lat, 50),
        "send_req_ms_p99": _p(send_lat, 99),
        **latency_fields(latencies),
        "server_cpu_pct_during_send": 100 * (cpu1 - cpu0) / wall if wall else 0.0,
        # server CPU per message: steadier than msg/s when other work shares the machine
        "server_cpu_us_per_msg": 1e6 * (cpu1 - cpu0) / sent if sent else 0.0,
        "client_cpu_pct_during_send": 100 * (me1 - me0) / wall if wall else 0.0,
        "errors": errors[0] + sum(sum(d.errors.values()) for d in devices),
        "error_codes": _merge_errors(devices),
        # everything else running on the machine meanwhile (other users' test runs, ...), in %
        # of one core: this shared 2-core machine is not quiet, and the figures move with it
        "other_cpu_pct_during_send": (
            100 * ((busy1 - busy0) - (cpu1 - cpu0) - (me1 - me0)) / wall if wall else 0.0
        ),
    }
    if timed_out:
        out["send_phase_timed_out"] = True
    if drain_timed_out:
        out["drain_timed_out"] = True
    out["_latencies_ms"] = [x * 1e3 for x in latencies]
    return out


def _p(sorted_s: list[float], p: float) -> float:
    from bench.common import pct

    return pct(sorted_s, p) * 1e3


def _merge_errors(devices: list[Device]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in devices:
        for k, v in d.errors.items():
            out[k] = out.get(k, 0) + v
    return out


def _machine_busy() -> float:
    """CPU seconds spent by every process on the machine (all cores), from /proc/stat."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0))


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


async def pairs_workload(
    label: str,
    users: int,
    messages: int,
    rate: float = 0.0,
    server_args: tuple[str, ...] = (),
    profile: str = "",
) -> dict[str, Any]:
    server = Server(*server_args, licences=users)
    pid = server.start()
    sampler = Sampler(pid)
    sampler.start()
    try:
        res: dict[str, Any] = {"label": label, "mode": "no-crypto"}
        res["server_rss_start_mb"] = sampler.rss() / MB
        t = time.perf_counter()
        devices = await register_all(server, server.licences)
        res["register_s"] = time.perf_counter() - t
        await asyncio.gather(*(d.synced for d in devices))
        spy = _start_profiler(pid, profile) if profile else None
        res.update(await run_pairs(server, sampler, devices, messages, rate))
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        res["connections_held"] = server.connections_held()
        res["server_rss_end_mb"] = sampler.rss() / MB
        await asyncio.gather(*(d.close() for d in devices), return_exceptions=True)
    finally:
        await sampler.stop()
        server.cleanup()
    res["server_rss_peak_mb"] = sampler.peak() / MB
    return res


def _start_profiler(pid: int, out: str) -> subprocess.Popen[bytes]:
    """py-spy sampling the server (raw collapsed stacks, for bench/profile_summary.py)."""
    spy = Path(sys.executable).with_name("py-spy")
    proc = subprocess.Popen(
        [
            str(spy),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            *os.environ.get("KLUIS_PYSPY_ARGS", "").split(),
            "--format",
            "raw",
            "-o",
            out,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # let it attach
    return proc


# ---- idle -----------------------------------------------------------------------------------------


def _spawn_children(
    server: Server, licences: list[str], procs: int, source_ips: int, hold_s: float
) -> list[tuple[subprocess.Popen[str], Path]]:
    children = []
    share = (len(licences) + procs - 1) // procs
    for p in range(procs):
        chunk = licences[p * share : (p + 1) * share]
        if not chunk:
            continue
        path = server.dir / f"licences-{p}.txt"
        path.write_text("\n".join(chunk))
        ips = ",".join(f"127.0.0.{2 + (p * source_ips + i) % 250}" for i in range(source_ips))
        cmd = [
            sys.executable,
            "-m",
            "bench.idle_child",
            "--url",
            server.url,
            "--licences",
            str(path),
            "--source-ips",
            ips,
            "--hold",
            str(hold_s),
        ]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        children.append((proc, path))
    return children


async def _read_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        line = await asyncio.wait_for(
            loop.run_in_executor(None, proc.stdout.readline), deadline - loop.time()
        )
        if not line:
            break
        if line.startswith(prefix):
            data: dict[str, Any] = json.loads(line[len(prefix) :])
            return data
    return {"ok": 0, "fail": -1}


async def idle_workload(
    label: str,
    counts: list[int],
    procs: int = 4,
    source_ips: int = 4,
    pairs_messages: int = 200,
    pair_users: int = 50,
) -> dict[str, Any]:
    """For each N in ``counts``: a fresh server, N idle devices, then pairs on top of them."""
    steps = []
    for n in counts:
        steps.append(await _idle_step(n, procs, source_ips, pairs_messages, pair_users))
        print(json.dumps({k: v for k, v in steps[-1].items() if not k.startswith("_")}), flush=True)
    top = steps[-1]
    res: dict[str, Any] = {"label": label, "mode": "no-crypto", "steps": steps}
    for k in (
        "users",
        "connections_held",
        "errors",
        "server_rss_start_mb",
        "server_rss_peak_mb",
        "server_rss_end_mb",
        "rss_per_connection_kb",
        "connect_s",
    ):
        res[k] = top.get(k)
    return res


async def _idle_step(
    n: int, procs: int, source_ips: int, pairs_messages: int, pair_users: int
) -> dict[str, Any]:
    server = Server(licences=n + pair_users)
    pid = server.start()
    sampler = Sampler(pid, interval=0.5)
    sampler.start()
    children: list[tuple[subprocess.Popen[str], Path]] = []
    res: dict[str, Any] = {"idle_connections_target": n}
    try:
        res["server_rss_start_mb"] = sampler.rss() / MB
        idle_licences, pair_licences = server.licences[:n], server.licences[n:]
        t = time.perf_counter()
        cpu0 = sampler.cpu()
        children = _spawn_children(server, idle_licences, procs, source_ips, hold_s=600)
        reports = await asyncio.gather(*(_read_line(p, "CONNECTED ", 300) for p, _ in children))
        res["connect_s"] = time.perf_counter() - t
        res["server_cpu_s_connect"] = sampler.cpu() - cpu0
        ok = sum(int(r.get("ok", 0)) for r in reports)
        res["idle_reconnects"] = sum(int(r.get("retried", 0)) for r in reports)
        fail = sum(max(0, int(r.get("fail", 0))) for r in reports)
        await asyncio.sleep(2.0)  # let the server settle before reading RSS
        res["connections_held"] = server.connections_held()
        res["idle_connected_ok"] = ok
        res["errors"] = fail
        res["child_errors"] = [r.get("errors", {}) for r in reports]
        rss_idle = sampler.rss()
        res["server_rss_idle_mb"] = rss_idle / MB
        held = max(1, int(res["connections_held"]))
        res["rss_per_connection_kb"] = (rss_idle - res["server_rss_start_mb"] * MB) / held / 1024
        res["server_fds"] = sampler.proc.num_fds()
        # pairs on top of the idle devices: throughput with N connected
        devices = await register_all(server, pair_licences)
        await asyncio.gather(*(d.synced for d in devices))
        spy_out = os.environ.get("KLUIS_BENCH_PROFILE_IDLE", "")
        spy = _start_profiler(pid, f"{spy_out}-{n}.txt") if spy_out else None
        pairs = await run_pairs(server, sampler, devices, pairs_messages)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        pairs.pop("_latencies_ms", None)
        res["users"] = n + len(devices)
        res["pairs_send_throughput_msg_s"] = pairs["send_throughput_msg_s"]
        res["pairs_e2e_ms_p50"] = pairs["e2e_ms_p50"]
        res["pairs_e2e_ms_p99"] = pairs["e2e_ms_p99"]
        res["pairs_messages_lost"] = pairs["messages_lost"]
        res["pairs_server_cpu_us_per_msg"] = pairs["server_cpu_us_per_msg"]
        res["pairs_other_cpu_pct_during_send"] = pairs["other_cpu_pct_during_send"]
        res["errors"] += pairs["errors"]
        await asyncio.gather(*(d.close() for d in devices), return_exceptions=True)
        res["connections_held_after_pairs"] = server.connections_held()
        res["server_rss_peak_mb"] = sampler.peak() / MB
    finally:
        for proc, _ in children:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc, _ in children:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        await asyncio.sleep(1.0)
        res["server_rss_end_mb"] = sampler.rss() / MB
        await sampler.stop()
        res.setdefault("server_rss_peak_mb", sampler.peak() / MB)
        server.cleanup()
    return res


# ---- offline burst --------------------------------------------------------------------------------


async def burst_workload(
    label: str, envelopes: int = 10_000, receivers: int = 100, senders: int = 50
) -> dict[str, Any]:
    """Queue ``envelopes`` for offline devices, then connect them all and time the drain."""
    per_sender = envelopes // senders
    server = Server(licences=receivers + senders)
    pid = server.start()
    sampler = Sampler(pid)
    sampler.start()
    res: dict[str, Any] = {
        "label": label,
        "mode": "no-crypto",
        "envelopes_queued_target": envelopes,
    }
    try:
        res["server_rss_start_mb"] = sampler.rss() / MB
        devs = await register_all(server, server.licences)
        rx, tx = devs[:receivers], devs[receivers:]
        targets = [(r.account, r.device_id, r.keys) for r in rx]
        await asyncio.gather(*(r.close() for r in rx))  # receivers go offline
        errors = [0]

        async def fill(j: int, s: Device) -> None:
            for k in range(per_sender):
                acc, dev, _ = targets[(j * per_sender + k) % receivers]
                reply = await s.send(acc, dev, body(time.perf_counter(), k))
                if isinstance(reply, f.Error):
                    errors[0] += 1

        t = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(fill(j, s) for j, s in enumerate(tx))), 120)
        res["queue_s"] = time.perf_counter() - t
        res["queue_throughput_msg_s"] = (per_sender * senders) / res["queue_s"]
        await asyncio.gather(*(s.close() for s in tx))
        queued = per_sender * senders - errors[0]
        res["messages_sent"] = queued
        await asyncio.sleep(0.5)

        received = [0]
        done = asyncio.get_running_loop().create_future()

        def on_deliver(_d: Device, envs: list[f.InEnvelope], _now: float) -> None:
            received[0] += len(envs)
            if received[0] >= queued and not done.done():
                done.set_result(None)

        cpu0 = sampler.cpu()
        t0 = time.perf_counter()
        again = [Device(keys=k, on_deliver=on_deliver) for _, _, k in targets]
        await asyncio.gather(*(d.auth(server.url) for d in again))
        t_connected = time.perf_counter()
        try:
            await asyncio.wait_for(done, 60)
        except TimeoutError:
            res["drain_timed_out"] = True
        t_received = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(d.synced for d in again)), 60)
        # the acks are in flight; wait until the server has deleted everything
        left = await _wait_empty(again, server, timeout=30)
        t_acked = time.perf_counter()
        cpu1 = sampler.cpu()
        drain = t_received - t0
        res.update(
            {
                "users": receivers + senders,
                "receivers": receivers,
                "messages_received": received[0],
                "messages_lost": queued - received[0],
                "connect_s": t_connected - t0,
                "drain_s": drain,
                "drain_and_deleted_s": t_acked - t0,
                "envelopes_left_after_acks": left,
                "drain_throughput_msg_s": received[0] / drain if drain else 0.0,
                "send_throughput_msg_s": received[0] / drain if drain else 0.0,
                "server_cpu_pct_during_send": 100 * (cpu1 - cpu0) / (t_acked - t0),
                "connections_held": server.connections_held(),
                "errors": errors[0] + sum(sum(d.errors.values()) for d in devs + again),
                "error_codes": _merge_errors(devs + again),
            }
        )
        res["server_rss_end_mb"] = sampler.rss() / MB
        await asyncio.gather(*(d.close() for d in again), return_exceptions=True)
    finally:
        await sampler.stop()
        server.cleanup()
    res["server_rss_peak_mb"] = sampler.peak() / MB
    return res


async def _wait_empty(devices: list[Device], server: Server, timeout: float) -> int:
    """Poll the store (read-only, WAL) until no envelope is left; return how many are left."""
    import sqlite3

    deadline = time.monotonic() + timeout
    left = -1
    while time.monotonic() < deadline:
        db = sqlite3.connect(f"file:{server.data / 'kluis.sqlite3'}?mode=ro", uri=True)
        try:
            left = int(db.execute("SELECT COUNT(*) FROM envelopes").fetchone()[0])
        finally:
            db.close()
        if left == 0:
            return 0
        await asyncio.sleep(0.02)
    return left
