"""Smoke test of the scale-out benchmark: two real nodes on a scratch PostgreSQL database and a
Redis prefix, a few cross-node messages, every one received. No timing is asserted."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

pytest.importorskip("picows")

from bench.scaleout import pairs_step

from tests.test_delivery_redis import REDIS_URL, _redis_reachable


async def test_pairs_across_two_nodes_lose_nothing() -> None:
    reason = await _redis_reachable()
    if reason is not None:
        pytest.skip(reason)
    res = await asyncio.wait_for(pairs_step(2, users=4, messages=5, sqlite=False), 120)
    assert res["messages_sent"] == 10
    assert res["messages_lost"] == 0 and res["errors"] == 0
    assert res["nodes_cpu_us_per_msg"] > 0
    client = aioredis.Redis.from_url(REDIS_URL)
    try:  # the bench leaves nothing in the shared Redis
        assert [k async for k in client.scan_iter(match="kluis-scaleout-*")] == []
    finally:
        await client.aclose()
