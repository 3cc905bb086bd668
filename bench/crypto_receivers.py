"""The receiving half of the real-crypto pairs and paced runs, in its own process.

Started by ``bench.crypto_mode``: opens the receivers' profiles (made and registered by the
parent), connects them, prints ``READY``, decrypts until each has ``--messages`` messages or
``--deadline`` passes, then prints ``LATENCIES [...]`` (seconds, send time to the return of
``receive()`` with the decrypted message) and exits. With senders and receivers in one process,
the receivers' decryption queued behind the senders' encryption and the figure measured the
generator, not the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path

from bench.crypto_mode import PASSPHRASE
from kluis.client.client import KluisClient


async def main(args: argparse.Namespace) -> None:
    profiles = json.loads(Path(args.profiles).read_text())
    clients = [KluisClient.open(Path(p), PASSPHRASE) for p in profiles]
    await asyncio.gather(*(c.connect() for c in clients))
    print("READY", flush=True)
    latencies: list[float] = []

    async def receiver(c: KluisClient) -> None:
        got = 0
        while got < args.messages:
            for m in await c.receive(wait=0.5, until=1):
                latencies.append(time.perf_counter() - float(m.text.split(" ", 1)[0]))
                got += 1

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(receiver(c) for c in clients)), args.deadline)
    print("LATENCIES " + json.dumps(latencies), flush=True)
    errors = sum(len(c.errors) for c in clients)
    print("ERRORS " + json.dumps(errors), flush=True)
    for c in clients:
        with contextlib.suppress(Exception):
            await c.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", required=True, help="JSON list of profile folders")
    ap.add_argument("--messages", type=int, required=True, help="messages per receiver")
    ap.add_argument("--deadline", type=float, default=300.0)
    import uvloop

    uvloop.install()
    asyncio.run(main(ap.parse_args()))
