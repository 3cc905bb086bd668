"""What a shared rate limit costs a node: the send bucket's take, local and on Redis.

    python -m bench.shared_limits [--quick] [--redis redis://127.0.0.1:6379/0]

``concurrency`` senders (coroutines) each take one token per "send" for ``seconds``, as the
connections of one node do: locally (``BucketMap.get(key).take``, the single-node path) and on
Redis (``BucketMap.take_shared`` with a ``RedisState``: batched, one Lua call per loop turn),
and, on Redis, with the device-list versions asked in the same round trip, as a send asks them.
Reported: takes per second and this process's CPU microseconds per take (Redis's own CPU is
not counted). Keys live under a random prefix and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from bench.common import machine, write_result
from kluis.server.ratelimit import BucketMap
from kluis.server.redis_state import RedisState

Take = Callable[[str], Awaitable[bool]]


async def _drive(take: Take, concurrency: int, seconds: float) -> dict[str, float]:
    done = 0
    stop = time.monotonic() + seconds

    async def sender(i: int) -> None:
        nonlocal done
        key = f"device-{i}"
        while time.monotonic() < stop:
            await take(key)
            done += 1

    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.gather(*(sender(i) for i in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    return {
        "takes_per_s": round(done / wall),
        "cpu_us_per_take": round(cpu / max(done, 1) * 1e6, 2),
    }


async def main(url: str, concurrency: int, seconds: float) -> dict[str, Any]:
    prefix = f"kluis-bench-{secrets.token_hex(4)}"
    rate, burst = 1e9, 10**9  # never refuses: the cost of asking, not of refusing
    local = BucketMap(rate, burst, time.monotonic)

    async def local_take(key: str) -> bool:
        await asyncio.sleep(0)  # a send yields at least once anyway
        return local.get(key).take()

    state = RedisState(url, prefix, counter_ttl_s=60)
    await state.start()
    shared = BucketMap(rate, burst, time.monotonic, state, "send")

    async def send_checks(key: str) -> bool:
        versions = state.versions([key])
        ok = await shared.take_shared(key)
        await versions
        return ok

    try:
        result: dict[str, Any] = {
            "concurrency": concurrency,
            "seconds": seconds,
            "local": await _drive(local_take, concurrency, seconds),
            "redis_take": await _drive(shared.take_shared, concurrency, seconds),
            "redis_take_and_versions": await _drive(send_checks, concurrency, seconds),
        }
    finally:
        await state.close()
        client = aioredis.Redis.from_url(url)
        try:
            keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
            for i in range(0, len(keys), 1000):
                await client.delete(*keys[i : i + 1000])
        finally:
            await client.aclose()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--concurrency", type=int, default=256)
    args = parser.parse_args()
    res = asyncio.run(main(args.redis, args.concurrency, 1.0 if args.quick else 5.0))
    res["machine"] = machine()
    res["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if not args.quick:
        write_result("shared-limits", res)
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=1))
