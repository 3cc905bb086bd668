"""Group fan-out (issue 9, "Measure"): one sender, N members online, opaque bodies.

Theory of operation: one server on loopback; N + 1 simulated devices (``bench/device.py``: real
keys and log-in, opaque bodies), each the only device of its own account, all connected from
this process over real WebSockets. The sender sends ``messages`` group messages, each ONE
``Send`` addressing all N member accounts with a random ``body_bytes`` body per device (560: the
size of a sealed Megolm envelope), one request in flight (back to back), or on a fixed schedule
(``rate``; latency then counts from the scheduled time). Every member acknowledges each
``Deliver`` at once, so the server deletes what it delivered.

Figures: server-accepted group messages per second (the sender's ``Done`` answers), and per
message the latency from its send to the LAST member's receipt (``e2e_ms_*``: one figure per
group message; ``envelope_ms_*``: every member's receipt). Receipt times are taken with
``time.perf_counter`` in the member's ``Deliver`` callback, in this process: they include this
process's own queueing of 1,000 connections on one event loop, which ``client_cpu_pct`` shows.

The per-device send rate limit (50 sends/s, a group send costing 1 + envelopes // 64) would hold
one sender to about 3 group messages/s at N = 1,000: these runs raise it with ``--limit`` (see
``SEND_LIMITS``) so that the figure is the server's capacity, not its policy.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import time
from typing import Any

from bench.common import MB, Sampler, Server, latency_fields, pct, send_time
from bench.device import Device
from bench.workloads import (
    _machine_busy,
    _merge_errors,
    _own_cpu,
    _start_profiler,
    register_all,
)
from kluis.protocol import frames as f

BODY_BYTES = 560
SEND_LIMITS = ("--limit", "send_rate_per_s=100000", "--limit", "send_burst=1000000")
_SEQ = struct.Struct("<I")


def group_frame(members: list[Device], seq: int, body_bytes: int = BODY_BYTES) -> f.Send:
    """One group message: a random body per member device, the message's number in front."""
    size = max(body_bytes, _SEQ.size)
    head = _SEQ.pack(seq)
    noise = os.urandom((size - _SEQ.size) * len(members))
    step = size - _SEQ.size
    return f.Send(
        rid=0,
        to=[
            f.Addressed(
                account=m.account,
                envelopes=[
                    f.OutEnvelope(device=m.device_id, body=head + noise[i * step : (i + 1) * step])
                ],
            )
            for i, m in enumerate(members)
        ],
    )


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def run_fanout(
    sampler: Sampler,
    sender: Device,
    members: list[Device],
    messages: int,
    rate: float = 0.0,
    body_bytes: int = BODY_BYTES,
    drain_s: float = 60.0,
    deadline_s: float = 240.0,
) -> dict[str, Any]:
    """Send ``messages`` group messages from ``sender`` to every one of ``members``."""
    n = len(members)
    counts = [0] * messages
    last = [0.0] * messages
    envelope_lat: list[float] = []
    sent_at: list[float] = [0.0] * messages
    complete = [0]
    all_in = asyncio.get_running_loop().create_future()

    def on_deliver(_d: Device, envs: list[f.InEnvelope], now: float) -> None:
        for e in envs:
            (seq,) = _SEQ.unpack_from(e.body)
            if seq >= messages:
                continue
            counts[seq] += 1
            last[seq] = max(last[seq], now)
            envelope_lat.append(now - sent_at[seq])
            if counts[seq] == n:
                complete[0] += 1
                if complete[0] == messages and not all_in.done():
                    all_in.set_result(None)

    for m in members:
        m.on_deliver = on_deliver
    accepted: list[int] = []
    done_lat: list[float] = []
    errors: dict[str, int] = {}
    interval = 1.0 / rate if rate > 0 else 0.0

    async def send_all(t_start: float) -> None:
        for k in range(messages):
            frame = group_frame(members, k, body_bytes)
            t0 = await send_time(t_start, k, interval)
            sent_at[k] = t0
            reply = await sender.request(frame)
            if isinstance(reply, f.Error):
                errors[reply.code] = errors.get(reply.code, 0) + 1
            else:
                accepted.append(k)
                done_lat.append(time.perf_counter() - t0)

    cpu0, me0, busy0 = sampler.cpu(), _own_cpu(), _machine_busy()
    load0 = load_average()
    t_send0 = time.perf_counter()
    timed_out = drain_timed_out = False
    try:
        await asyncio.wait_for(send_all(t_send0), deadline_s)
    except TimeoutError:
        timed_out = True
    t_send1 = time.perf_counter()
    try:
        await asyncio.wait_for(all_in, drain_s)
    except TimeoutError:
        drain_timed_out = True
    t_recv1 = time.perf_counter()
    cpu1, me1, busy1 = sampler.cpu(), _own_cpu(), _machine_busy()
    send_wall, wall = t_send1 - t_send0, t_recv1 - t_send0
    to_last = sorted(last[k] - sent_at[k] for k in accepted if counts[k] == n)
    done_lat.sort()
    envelope_lat.sort()
    delivered = sum(counts[k] for k in accepted)
    out: dict[str, Any] = {
        "members": n,
        "messages_per_sender": messages,
        "target_rate_msg_s": rate or "max",
        "in_flight": 1,
        "body_bytes": body_bytes,
        "send_frame_bytes": len(f.encode(group_frame(members, 0, body_bytes))),
        "messages_sent": len(accepted),
        "messages_complete": len(to_last),  # reached every member
        "envelopes_expected": len(accepted) * n,
        "envelopes_received": delivered,
        "envelopes_lost": len(accepted) * n - delivered,
        "send_wall_s": send_wall,
        "all_received_wall_s": wall,
        "send_throughput_msg_s": len(accepted) / send_wall if send_wall else 0.0,
        "envelope_throughput_s": delivered / wall if wall else 0.0,
        "send_done_ms_p50": pct(done_lat, 50) * 1e3,
        "send_done_ms_p99": pct(done_lat, 99) * 1e3,
        # one figure per group message: its send to the last member's receipt
        **latency_fields(to_last),
        **{
            k.replace("e2e_ms", "envelope_ms"): v
            for k, v in latency_fields(envelope_lat).items()
            if k.endswith(("p50", "p99", "max"))
        },
        "server_cpu_pct_during_run": 100 * (cpu1 - cpu0) / wall if wall else 0.0,
        "server_cpu_ms_per_group_msg": 1e3 * (cpu1 - cpu0) / len(accepted) if accepted else 0.0,
        "server_cpu_us_per_envelope": 1e6 * (cpu1 - cpu0) / delivered if delivered else 0.0,
        "client_cpu_pct_during_run": 100 * (me1 - me0) / wall if wall else 0.0,
        "other_cpu_pct_during_run": (
            100 * ((busy1 - busy0) - (cpu1 - cpu0) - (me1 - me0)) / wall if wall else 0.0
        ),
        "load_average_start": load0,
        "load_average_end": load_average(),
        "errors": sum(errors.values()) + sum(sum(d.errors.values()) for d in [sender, *members]),
        "error_codes": {**errors, **_merge_errors([sender, *members])},
    }
    # the server's CPU % "during send" in the peer field's sense: over the whole run here
    out["server_cpu_pct_during_send"] = out["server_cpu_pct_during_run"]
    if timed_out:
        out["send_phase_timed_out"] = True
    if drain_timed_out:
        out["drain_timed_out"] = True
    out["_latencies_ms"] = [x * 1e3 for x in to_last]
    return out


async def fanout_workload(
    label: str,
    members: int,
    messages: int,
    rate: float = 0.0,
    body_bytes: int = BODY_BYTES,
    server_args: tuple[str, ...] = SEND_LIMITS,
    profile: str = "",
) -> dict[str, Any]:
    """A fresh server, ``members`` + 1 devices, then :func:`run_fanout` (with ``profile``,
    py-spy records the server's stacks meanwhile into that file)."""
    server = Server(*server_args, licences=members + 1)
    pid = server.start()
    sampler = Sampler(pid)
    sampler.start()
    devices: list[Device] = []
    res: dict[str, Any] = {
        "label": label,
        "mode": "no-crypto (opaque bodies)",
        "server_limit_overrides": [a for a in server_args if a != "--limit"],
    }
    try:
        res["server_rss_start_mb"] = sampler.rss() / MB
        t = time.perf_counter()
        devices = await register_all(server, server.licences)
        await asyncio.wait_for(asyncio.gather(*(d.synced for d in devices)), 60)
        res["register_s"] = time.perf_counter() - t
        res["users"] = len(devices)
        res["server_rss_connected_mb"] = sampler.rss() / MB
        spy = _start_profiler(pid, profile) if profile else None
        res.update(await run_fanout(sampler, devices[0], devices[1:], messages, rate, body_bytes))
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        res["connections_held"] = server.connections_held()
        res["server_rss_end_mb"] = sampler.rss() / MB
    finally:
        await asyncio.gather(*(d.close() for d in devices), return_exceptions=True)
        await sampler.stop()
        server.cleanup()
    seen = [res.get(k, 0.0) for k in ("server_rss_start_mb", "server_rss_connected_mb")]
    res["server_rss_peak_mb"] = max([sampler.peak() / MB, *seen, res.get("server_rss_end_mb", 0)])
    return res


def table(rows: list[dict[str, Any]]) -> str:
    """A short text table of group runs."""
    head = (
        f"{'run':<28}{'N':>6}{'msgs':>6}{'msg/s':>8}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'max ms':>9}{'srv CPU%':>9}{'RSS MB':>8}{'load1':>7}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['label']:<28}{r.get('members', 0):>6}{r.get('messages_sent', 0):>6}"
            f"{r.get('send_throughput_msg_s', 0):>8.1f}{r.get('e2e_ms_p50', 0):>9.1f}"
            f"{r.get('e2e_ms_p99', 0):>9.1f}{r.get('e2e_ms_max', 0):>9.1f}"
            f"{r.get('server_cpu_pct_during_run', 0):>9.0f}{r.get('server_rss_peak_mb', 0):>8.0f}"
            f"{(r.get('load_average_start') or [0])[0]:>7.2f}"
        )
    return "\n".join(lines)
