"""The state several nodes share in Redis (server/redis_state.py) and the bus's presence keys
(server/delivery/redis.py), on a real Redis with a prefix per test.

Two ``RedisState`` (or ``RedisBus``) objects on one prefix are two nodes. Redis going away is a
private ``redis-server`` on a free port, stopped by the test."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from kluis.errors import RateLimited
from kluis.protocol import frames as f
from kluis.server.blobs import BlobService
from kluis.server.config import Limits
from kluis.server.delivery.redis import RedisBus
from kluis.server.ratelimit import BucketMap
from kluis.server.redis_state import RedisState, RedisStateError
from tests.redis_testing import PrivateRedis, prefix
from tests.test_delivery_redis import REDIS_URL, Sub, until

State = Callable[..., Awaitable[RedisState]]


@pytest.fixture
async def spy() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def nodes(prefix: str) -> AsyncIterator[State]:
    """``await nodes()``: one more node's RedisState on the test's prefix, started."""
    started: list[RedisState] = []

    async def make(url: str = REDIS_URL, **kwargs: float) -> RedisState:
        state = RedisState(url, prefix, counter_ttl_s=60, **kwargs)  # type: ignore[arg-type]
        await state.start()
        started.append(state)
        return state

    yield make
    for state in started:
        await state.close()


async def test_two_nodes_spend_from_one_bucket_and_idle_keys_expire(
    nodes: State, prefix: str, spy: aioredis.Redis
) -> None:
    one, two = await nodes(), await nodes()
    clock = time.monotonic
    # A device alternating between nodes: the burst of one bucket in total, not one per node.
    buckets = [BucketMap(0.001, 5, clock, one, "send"), BucketMap(0.001, 5, clock, two, "send")]
    taken = [await buckets[i % 2].take_shared("device-a") for i in range(12)]
    assert taken == [True] * 5 + [False] * 7
    assert await buckets[0].take_shared("device-b")  # another key, its own bucket
    assert await spy.exists(f"{prefix}:rl:send:device-a")
    # A key lives as long as its bucket takes to refill, and no longer.
    fast = BucketMap(1000.0, 5, clock, one, "claim")
    assert await fast.take_many(["x", "y", "x"]) == {"x": True, "y": True}
    ttl = await spy.pttl(f"{prefix}:rl:claim:x")
    assert 0 < ttl <= 2000
    deadline = asyncio.get_running_loop().time() + 5
    while await spy.exists(f"{prefix}:rl:claim:x"):
        assert asyncio.get_running_loop().time() < deadline, "the idle key did not expire"
        await asyncio.sleep(0.1)


async def test_requests_of_one_turn_share_one_round_trip(nodes: State) -> None:
    state = await nodes()
    asked = [state.take("send", f"d{i}", 1, 1.0, 3) for i in range(50)]
    versions = state.versions(["acc-1", "acc-2"])
    counts = state.count([("dev-1", 10), ("dev-2", 20)])
    assert all(await asyncio.gather(*asked))
    assert await versions == [None, None]
    assert await counts == [(1, 10, True), (1, 20, True)]
    assert state.failures == 0


async def test_mailbox_counters_and_versions_are_shared(nodes: State) -> None:
    one, two = await nodes(), await nodes()
    assert await one.count([("dev", 100)]) == [(1, 100, True)]  # new: the store must count
    assert await two.count([("dev", 50), ("dev", 1)]) == [(2, 150, False), (3, 151, False)]
    await one.set_count("dev", 1, 7)  # what the store counted
    assert await two.count([("dev", 3)]) == [(2, 10, False)]
    await two.add_count("dev", 5, 500)
    assert await one.count([("dev", 0)]) == [(8, 510, False)]
    await one.bump_version("acc")
    (first,) = await two.versions(["acc"]) or [None]
    await two.bump_version("acc")
    (second,) = await one.versions(["acc"]) or [None]
    assert first is not None and second is not None and first != second


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    yield server
    server.stop()


async def test_redis_down_fails_open_to_the_local_bucket_and_logs_once_per_backoff(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    url = private_redis.url
    with pytest.raises(RedisStateError):
        await RedisState(url, "p", counter_ttl_s=60, connect_timeout_s=0.5).start()
    private_redis.start()
    now = [0.0]
    state = RedisState(url, "p", counter_ttl_s=60, op_timeout_s=0.5, clock=lambda: now[0])
    for _ in range(100):
        try:
            await state.start()
            break
        except RedisStateError:
            await asyncio.sleep(0.05)
    assert state.available, "the private redis-server did not start"
    try:
        buckets = BucketMap(0.001, 3, lambda: now[0], state, "send")
        assert await buckets.take_shared("dev-7f3a")  # shared: 2 left in Redis
        private_redis.stop()
        caplog.set_level(logging.WARNING, "kluis.server.redis_state")
        # Redis gone: the local bucket decides (a fresh one: 3), one warning per back-off step.
        taken = [await buckets.take_shared("dev-7f3a") for _ in range(5)]
        assert taken == [True] * 3 + [False] * 2
        assert await state.count([("dev", 1)]) is None
        assert await state.versions(["acc"]) is None
        warnings = [r for r in caplog.records if r.name == "kluis.server.redis_state"]
        assert len(warnings) == 1
        assert "dev-7f3a" not in warnings[0].getMessage()  # no key, no device in the log
        # Back: after the back-off, the shared bucket (a fresh Redis: full again) decides.
        private_redis.start()
        now[0] += 1.0
        for _ in range(100):
            if await state.count([("dev", 1)]) is not None:
                break
            now[0] += 60.0
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the state did not come back with Redis")
        # The local bucket is empty: only the shared one (full again) can say yes.
        assert await buckets.take_shared("dev-7f3a")
    finally:
        await state.close()


async def test_presence_names_the_node_and_only_the_owner_releases_it(
    prefix: str, spy: aioredis.Redis
) -> None:
    one = RedisBus(REDIS_URL, prefix, presence_ttl_s=30, presence_refresh_s=0.05)
    two = RedisBus(REDIS_URL, prefix, presence_ttl_s=30, presence_refresh_s=0.05)
    await one.start()
    await two.start()
    try:
        key = f"{prefix}:on:dev"
        old, new = Sub(), Sub()
        one.subscribe("dev", old)
        await until_value(spy, key, one.node)
        assert 25 <= await spy.ttl(key) <= 30
        two.subscribe("dev", new)  # the device moved: the newest connection wins
        await until(lambda: old.events == ["displaced"])
        await until_value(spy, key, two.node)
        one.unsubscribe("dev", old)  # the old connection closes: the key is not its own
        await asyncio.sleep(0.2)  # a few refreshes of node one: they leave it alone too
        assert await spy.get(key) == two.node
        assert await one.online_devices() == 1
        assert (one.local_devices, two.local_devices) == (0, 1)
        two.subscribe("other", Sub())
        await until_value(spy, f"{prefix}:on:other", two.node)
        deadline = asyncio.get_running_loop().time() + 5
        while await two.online_devices() != 2:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        two.unsubscribe("dev", new)
        await until_value(spy, key, None)
    finally:
        await one.close()
        await two.close()
    # A clean stop takes the node's devices offline at once.
    assert await spy.get(f"{prefix}:on:other") is None
    assert await spy.hlen(f"{prefix}:nodes") == 0


async def test_presence_displaces_a_connection_whose_key_names_another_node(
    prefix: str, spy: aioredis.Redis
) -> None:
    """The ``sub`` signal of the device's newer connection was lost: the refresh finds the key
    naming the other node and closes this node's connection all the same."""
    bus = RedisBus(REDIS_URL, prefix, presence_ttl_s=30, presence_refresh_s=0.05)
    await bus.start()
    try:
        old, kept = Sub(), Sub()
        bus.subscribe("dev", old)
        bus.subscribe("kept", kept)
        await until_value(spy, f"{prefix}:on:dev", bus.node)
        await spy.set(f"{prefix}:on:dev", "another-node", ex=30)  # no signal published
        await until(lambda: old.events == ["displaced"])
        await asyncio.sleep(0.2)
        assert kept.events == [] and bus.local_devices == 1
        assert await spy.get(f"{prefix}:on:dev") == "another-node"
    finally:
        await bus.close()


async def until_value(spy: aioredis.Redis, key: str, value: str | None) -> None:
    deadline = asyncio.get_running_loop().time() + 5
    while (current := await spy.get(key)) != value:
        assert asyncio.get_running_loop().time() < deadline, f"{key} is {current!r}"
        await asyncio.sleep(0.01)


async def test_the_shared_limits_bench_runs_and_leaves_no_key(prefix: str) -> None:
    from bench.shared_limits import main

    result = await main(REDIS_URL, 8, 0.05)
    for part in ("local", "redis_take", "redis_take_and_versions"):
        assert result[part]["takes_per_s"] > 0
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        assert [k async for k in client.scan_iter(match="kluis-bench-*")] == []
    finally:
        await client.aclose()


async def test_blob_tickets_and_key_claims_share_their_buckets_across_nodes(
    nodes: State, tmp_path: Path
) -> None:
    one, two = await nodes(), await nodes()
    limits = Limits(blob_ticket_burst=3, blob_ticket_rate_per_s=0.001)
    services = [
        BlobService.open(tmp_path / name / "blobs", limits, time.time, state)
        for name, state in (("one", one), ("two", two))
    ]
    answers = []
    for i in range(6):  # the device asks each node in turn
        try:
            await services[i % 2].answer("dev-1", f.BlobUpload(rid=i, size=10, recipients=1))
            answers.append("ticket")
        except RateLimited:
            answers.append("rate_limited")
    assert answers == ["ticket"] * 3 + ["rate_limited"] * 3
    # One-time keys per target device: every node draws on one budget.
    targets = [BucketMap(0.001, 2, time.monotonic, s, "target") for s in (one, two)]
    assert await targets[0].take_many(["t1", "t2"]) == {"t1": True, "t2": True}
    assert await targets[1].take_many(["t1"]) == {"t1": True}
    assert await targets[0].take_many(["t1", "t2"]) == {"t1": False, "t2": True}


__all__ = ["prefix"]  # the shared fixture, imported for its name
