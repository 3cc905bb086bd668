"""The members of the real-crypto group fan-out run, in a process of their own.

Started by ``bench.groups_crypto``: opens the member profiles (made and registered by the
parent), connects them, prints ``READY``, then each member reads (unseals, decrypts with Olm or
Megolm, stores) until it has ``--messages`` bench messages or ``--deadline`` passes. It prints
``CPU seconds`` (its own CPU time so far) and ``RECEIPTS [[seq, perf_counter], ...]`` per member (CLOCK_MONOTONIC, shared with the parent),
then ``ERRORS n`` and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from pathlib import Path

from bench.crypto_mode import PASSPHRASE
from kluis.client.client import KluisClient

PREFIX = "bench "


async def main(args: argparse.Namespace) -> None:
    profiles = json.loads(Path(args.profiles).read_text())
    clients = [KluisClient.open(Path(p), PASSPHRASE) for p in profiles]
    sem = asyncio.Semaphore(50)

    async def connect(c: KluisClient) -> None:
        async with sem:
            await c.connect()

    await asyncio.gather(*(connect(c) for c in clients))
    print("READY", flush=True)
    receipts: list[list[tuple[int, float]]] = [[] for _ in clients]

    async def member(i: int, c: KluisClient) -> None:
        while len(receipts[i]) < args.messages:
            for m in await c.receive(wait=0.5, until=1):
                now = time.perf_counter()
                if m.text.startswith(PREFIX):
                    receipts[i].append((int(m.text.split(" ", 2)[1]), now))

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(*(member(i, c) for i, c in enumerate(clients))), args.deadline
        )
    cpu = os.times()
    print(f"CPU {cpu.user + cpu.system}", flush=True)  # before the parent can no longer ask
    print("RECEIPTS " + json.dumps(receipts), flush=True)
    print("ERRORS " + json.dumps(sum(len(c.errors) for c in clients)), flush=True)
    for c in clients:
        with contextlib.suppress(Exception):
            await c.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", required=True, help="JSON list of profile folders")
    ap.add_argument("--messages", type=int, required=True, help="bench messages per member")
    ap.add_argument("--deadline", type=float, default=300.0)
    import uvloop

    uvloop.install()
    asyncio.run(main(ap.parse_args()))
