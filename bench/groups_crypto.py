"""Group fan-out with real end-to-end encryption: every device a full ``KluisClient``.

The sender (in this process) creates a group of N member accounts (``create_group``: device
lists, one-time key claims and Olm sessions for all N, one ``Send`` of the signed update), then
sends with ``send``: Megolm encryption once, sealed per member device, one ``Send`` each. The
first message also shares the Megolm session key over Olm with every member device; it is
reported apart (``first_message_*``). The members run in ``bench/group_members.py`` (one process)
and decrypt every message before its receipt time is taken, so the latency to the last member
includes that process working through N members' decryption on one event loop.

Server limits raised for this run (``--limit``): the sender claims one-time keys of N accounts
in a row (``claim_burst``; the default burst of 50 would spread 250 claims over 100 s), and
sends with the raised send limits of ``bench.groups``; and ``max_frame_bytes`` (see ``BIG_FRAME``). Profiles use a fast argon2id
(``time_cost=1, memory_kib=8192``), as in ``bench/crypto_mode.py``.
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
from bench.crypto_mode import PASSPHRASE, make_client
from bench.group_members import PREFIX
from bench.groups import SEND_LIMITS, load_average
from bench.workloads import _machine_busy, _own_cpu
from kluis.client.client import KluisClient
from kluis.crypto.profile_key import new_params

# create_group sends the signed member list inside every member device's envelope: the Send
# grows with N squared (455 KB at N = 100, past the 2 MiB max_frame_bytes near N = 200). An
# oversized frame gets an Error without rid, which KluisClient's request never matches (it
# waits forever), so the real-crypto runs raise the frame limit; see BIG_FRAME.
BIG_FRAME = 16 * 2**20


def crypto_limits(members: int) -> tuple[str, ...]:
    return (
        *SEND_LIMITS,
        "--limit",
        f"claim_burst={members + 50}",
        "--limit",
        f"max_frame_bytes={BIG_FRAME}",
    )


async def _register_member(server: Server, licence: str, profile: Path) -> str:
    http = f"http://127.0.0.1:{server.port}"
    fast = new_params(time_cost=1, memory_kib=8192)
    client = await KluisClient.register(http, licence, profile, PASSPHRASE, kdf=fast)
    account = client.account_id
    await client.close()
    return account


async def crypto_group_workload(
    label: str, members: int, messages: int, rate: float = 1.0, deadline_s: float = 300.0
) -> dict[str, Any]:
    """``members`` + 1 real clients, one group, then ``messages`` group messages at ``rate``/s."""
    args = crypto_limits(members)
    server = Server(*args, licences=members + 1)
    pid = server.start()
    sampler = Sampler(pid)
    sampler.start()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tmp = Path(tempfile.mkdtemp(prefix="kluis-bench-groups-", dir=shm))
    sender: KluisClient | None = None
    child: asyncio.subprocess.Process | None = None
    res: dict[str, Any] = {
        "label": label,
        "mode": "crypto (vodozemac Olm + Megolm)",
        "server_limit_overrides": [a for a in args if a != "--limit"],
        "profiles_on": str(shm or tempfile.gettempdir()),
    }
    try:
        res["server_rss_start_mb"] = sampler.rss() / MB
        t = time.perf_counter()
        sem = asyncio.Semaphore(10)
        codes = server.licences[1:]

        async def one(i: int, code: str) -> str:
            async with sem:
                return await _register_member(server, code, tmp / f"m{i}")

        _stage("registering", members + 1)
        accounts = list(
            await asyncio.wait_for(
                asyncio.gather(*(one(i, c) for i, c in enumerate(codes))), deadline_s
            )
        )
        sender = await asyncio.wait_for(make_client(server, server.licences[0], tmp / "sender"), 60)
        res["register_s"] = time.perf_counter() - t
        listing = tmp / "members.json"
        listing.write_text(json.dumps([str(tmp / f"m{i}") for i in range(members)]))
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.group_members",
            "--profiles",
            str(listing),
            "--messages",
            str(messages + 1),
            "--deadline",
            str(deadline_s),
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            limit=1 << 26,  # the RECEIPTS line holds every receipt
        )
        assert child.stdout is not None
        _stage("starting members", res["register_s"])
        ready = await asyncio.wait_for(child.stdout.readline(), 300)
        if not ready.startswith(b"READY"):
            raise RuntimeError(f"member process failed: {ready!r}")
        members_proc = psutil.Process(child.pid)
        res["connections_held"] = server.connections_held()
        res["server_rss_connected_mb"] = sampler.rss() / MB

        t = time.perf_counter()
        _stage("creating group", members)
        group = (await asyncio.wait_for(sender.create_group("bench", accounts), 300)).id
        res["group_create_s"] = time.perf_counter() - t
        sent_at: dict[int, float] = {}
        call_s: dict[int, float] = {}
        errors: dict[str, int] = {}

        async def send(k: int, t0: float) -> None:
            assert sender is not None
            sent_at[k] = t0
            try:
                await sender.send(group, f"{PREFIX}{k} {t0:.6f}")
                call_s[k] = time.perf_counter() - t0
            except Exception as exc:  # counted, not fatal: the figure says how many
                key = getattr(exc, "code", type(exc).__name__)
                errors[key] = errors.get(key, 0) + 1

        _stage("first message", res["group_create_s"])
        await asyncio.wait_for(
            send(0, time.perf_counter()), 300
        )  # shares the Megolm key with every member over Olm
        await asyncio.sleep(2.0)  # let the members take the key before the measured messages
        cpu0, me0, busy0 = sampler.cpu(), _own_cpu(), _machine_busy()
        mcpu0 = _proc_cpu(members_proc)
        load0 = load_average()
        t_send0 = time.perf_counter()
        interval = 1.0 / rate if rate > 0 else 0.0
        _stage("measured messages", call_s.get(0))
        timed_out = False
        try:
            async with asyncio.timeout(deadline_s):
                for k in range(1, messages + 1):
                    await send(k, await send_time(t_send0, k - 1, interval))
            _stage("waiting for members", len(call_s))
        except TimeoutError:
            timed_out = True
        t_send1 = time.perf_counter()
        receipts: list[list[list[float]]] = []
        member_errors = -1
        mcpu1 = mcpu0
        try:
            async with asyncio.timeout(deadline_s + 30):
                async for line in child.stdout:
                    if line.startswith(b"CPU "):
                        mcpu1 = float(line[len(b"CPU ") :])
                    elif line.startswith(b"RECEIPTS "):
                        receipts = json.loads(line[len(b"RECEIPTS ") :])
                    elif line.startswith(b"ERRORS "):
                        member_errors = int(json.loads(line[len(b"ERRORS ") :]))
                        break
        except TimeoutError:
            res["drain_timed_out"] = True
        cpu1, me1, busy1 = sampler.cpu(), _own_cpu(), _machine_busy()
        wall = max(time.perf_counter() - t_send0, 1e-9)  # the CPU figures' window
        last: dict[int, float] = {}
        counts: dict[int, int] = {}
        envelope_lat: list[float] = []
        for per_member in receipts:
            for seq_f, at in per_member:
                seq = int(seq_f)
                counts[seq] = counts.get(seq, 0) + 1
                last[seq] = max(last.get(seq, 0.0), at)
                if seq >= 1 and seq in sent_at:
                    envelope_lat.append(at - sent_at[seq])
        measured = [k for k in range(1, messages + 1) if k in call_s]
        to_last = sorted(last[k] - sent_at[k] for k in measured if counts.get(k) == members)
        sends = sorted(call_s[k] for k in measured)
        received = sum(counts.get(k, 0) for k in measured)
        res.update(
            {
                "users": members + 1,
                "members": members,
                "messages_per_sender": messages,
                "target_rate_msg_s": rate or "max",
                "messages_sent": len(measured),
                "messages_complete": len(to_last),
                "envelopes_expected": len(measured) * members,
                "envelopes_received_decrypted": received,
                "envelopes_lost": len(measured) * members - received,
                "first_message_send_s": call_s.get(0, float("nan")),
                "first_message_to_last_member_s": (
                    last[0] - sent_at[0] if counts.get(0) == members else float("nan")
                ),
                "send_wall_s": t_send1 - t_send0,
                "send_throughput_msg_s": len(measured) / (t_send1 - t_send0),
                "send_call_ms_p50": pct(sends, 50) * 1e3,  # encrypt + seal + server's Done
                "send_call_ms_p99": pct(sends, 99) * 1e3,
                **latency_fields(to_last),
                **{
                    k.replace("e2e_ms", "envelope_ms"): v
                    for k, v in latency_fields(sorted(envelope_lat)).items()
                    if k.endswith(("p50", "p99", "max"))
                },
                "server_cpu_pct_during_run": 100 * (cpu1 - cpu0) / wall,
                "server_cpu_ms_per_group_msg": (
                    1e3 * (cpu1 - cpu0) / len(measured) if measured else 0.0
                ),
                "sender_process_cpu_pct_during_run": 100 * (me1 - me0) / wall,
                "members_process_cpu_pct_during_run": 100 * (mcpu1 - mcpu0) / wall,
                "members_cpu_ms_per_envelope": 1e3 * (mcpu1 - mcpu0) / received if received else 0,
                "other_cpu_pct_during_run": 100
                * ((busy1 - busy0) - (cpu1 - cpu0) - (me1 - me0) - (mcpu1 - mcpu0))
                / wall,
                "load_average_start": load0,
                "load_average_end": load_average(),
                "errors": sum(errors.values()) + len(sender.errors) + max(0, member_errors),
                "error_codes": errors,
                "server_rss_end_mb": sampler.rss() / MB,
            }
        )
        res["server_cpu_pct_during_send"] = res["server_cpu_pct_during_run"]
        if timed_out:
            res["send_phase_timed_out"] = True
        res["_latencies_ms"] = [x * 1e3 for x in to_last]
    finally:
        if sender is not None:
            with contextlib.suppress(Exception):  # best effort at the end of a run
                await sender.close()
        if child is not None and child.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.wait(), 30)
            if child.returncode is None:
                child.kill()
                await child.wait()
        await sampler.stop()
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    seen = [res.get(k, 0.0) for k in ("server_rss_start_mb", "server_rss_connected_mb")]
    res["server_rss_peak_mb"] = max([sampler.peak() / MB, *seen, res.get("server_rss_end_mb", 0)])
    return res


def _stage(what: str, detail: object = "") -> None:
    print(
        f"[groups-crypto {time.strftime('%H:%M:%S')}] {what} {detail}", file=sys.stderr, flush=True
    )


def _proc_cpu(proc: psutil.Process) -> float:
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)
