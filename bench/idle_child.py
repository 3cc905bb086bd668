"""One idle-connection generator process: registers its share of devices and holds them open.

Started by ``bench.workloads``; prints ``CONNECTED {json}`` once every device is logged in (or
failed), then holds until its stdin closes or ``--hold`` seconds pass, and exits. Each process
stays under the 20,000 open-file cap; connections leave from several 127.0.0.x addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time

from bench.common import MB, loopback_only, raise_nofile
from bench.device import Device


async def main(args: argparse.Namespace) -> None:
    limit = raise_nofile()
    ips = [loopback_only(ip) for ip in args.source_ips.split(",")]
    loopback_only(args.url.split("//", 1)[1])
    with open(args.licences) as fh:
        codes = fh.read().split()
    sem = asyncio.Semaphore(args.concurrency)
    devices: list[Device] = []
    fails: dict[str, int] = {}
    retried = [0]

    async def one(i: int, code: str) -> None:
        async with sem:
            last = "no attempt"
            for attempt in range(args.attempts):  # a real client reconnects too
                d = Device()
                try:
                    await d.register(args.url, code, local_addr=(ips[i % len(ips)], 0))
                    devices.append(d)
                    if attempt:
                        retried[0] += 1
                    return
                except Exception as exc:
                    last = type(exc).__name__ + ":" + str(exc)[:60]
                    with contextlib.suppress(Exception):
                        await d.close()
                    if d.account:  # registered, then failed: the licence is spent
                        break
            fails[last] = fails.get(last, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, c) for i, c in enumerate(codes)))
    import psutil

    report = {
        "ok": len(devices),
        "fail": sum(fails.values()),
        "retried": retried[0],
        "connect_s": time.perf_counter() - t0,
        "nofile": limit,
        "rss_mb": psutil.Process().memory_info().rss / MB,
        "errors": dict(list(fails.items())[:3]),
    }
    print("CONNECTED " + json.dumps(report), flush=True)
    loop = asyncio.get_running_loop()
    eof = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), eof.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(eof.wait(), timeout=args.hold)
    alive = sum(1 for d in devices if d.transport is not None and not d.transport.is_disconnected)
    print("ALIVE " + json.dumps({"alive": alive}), flush=True)
    os._exit(0)  # the kernel closes the sockets


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--licences", required=True)
    ap.add_argument("--source-ips", default="127.0.0.2")
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--attempts", type=int, default=3)
    ap.add_argument("--hold", type=float, default=600)
    import uvloop

    uvloop.install()
    asyncio.run(main(ap.parse_args()))
