"""A private ``redis-server`` for tests that stop Redis under a running node (never the shared
one: other tests use it at the same time)."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.kluis_testing import free_port


class PrivateRedis:
    """One port, a server started and stopped at will (no persistence)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        options = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), *options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


def drop_prefix(url: str, prefix: str) -> None:
    """Delete every key of one test's prefix (shared counters outlive the nodes by a month)."""
    import redis

    with contextlib.suppress(redis.RedisError), redis.Redis.from_url(url) as client:
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A Redis key prefix of this test's own; its keys are deleted afterwards. Skips when the
    shared Redis does not answer."""
    from tests.test_delivery_redis import REDIS_URL, _redis_reachable

    reason = await _redis_reachable()
    if reason is not None:
        pytest.skip(reason)
    name = f"kluis-test-{secrets.token_hex(6)}"
    yield name
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{name}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
