"""The delivery bus contract, on InProcessBus and on RedisBus (server/delivery/redis.py).

Two RedisBus instances on one channel prefix are two nodes: a signal published on one reaches
the subscriber on the other. Each test uses its own prefix. Skipped, with the reason, only when
Redis does not answer at ``KLUIS_TEST_REDIS`` (default: the CI's, 127.0.0.1:6379)."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from kluis.server.delivery.memory import InProcessBus
from kluis.server.delivery.protocol import DeliveryBus
from kluis.server.delivery.redis import RedisBus, RedisBusError

REDIS_URL = os.environ.get("KLUIS_TEST_REDIS", "redis://127.0.0.1:6379/0")


class Sub:
    def __init__(self) -> None:
        self.events: list[str] = []

    def envelope(self, seq: int, body: bytes | None) -> None:
        self.events.append(f"envelope {seq} {body!r}")

    def keys_low(self, count: int) -> None:
        self.events.append(f"keys {count}")

    def displaced(self) -> None:
        self.events.append("displaced")

    def revoked(self) -> None:
        self.events.append("revoked")


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def _redis_reachable() -> str | None:
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
        return None
    except Exception as exc:
        return f"Redis is not reachable at {REDIS_URL}: {exc}"
    finally:
        await client.aclose()


Nodes = Callable[[int], Awaitable[list[DeliveryBus]]]


@pytest.fixture(params=["memory", "redis"])
async def nodes(request: pytest.FixtureRequest) -> AsyncIterator[Nodes]:
    """``await nodes(n)``: n buses of one deployment (one shared InProcessBus in memory)."""
    started: list[RedisBus] = []
    prefix = f"kluis-test-{secrets.token_hex(6)}"
    if request.param == "redis":
        reason = await _redis_reachable()
        if reason is not None:
            pytest.skip(reason)

    async def make(n: int) -> list[DeliveryBus]:
        if request.param == "memory":
            shared = InProcessBus()
            return [shared] * n
        buses = [RedisBus(REDIS_URL, prefix) for _ in range(n)]
        for bus in buses:
            await bus.start()
            started.append(bus)
        return list(buses)

    yield make
    for bus in started:
        await bus.close()


async def test_the_newest_subscriber_wins_and_revocation_reaches_it(nodes: Nodes) -> None:
    (bus,) = await nodes(1)
    old, new = Sub(), Sub()
    bus.subscribe("d", old)
    bus.announce("d", 1, b"x")
    bus.subscribe("d", new)
    bus.unsubscribe("d", old)  # the old connection closing does not remove the new one
    bus.announce("d", 2)
    bus.keys_low("d", 3)
    bus.revoke("d")
    bus.announce("other", 1)
    await asyncio.sleep(0.05)  # nothing echoes back from the node's own publications
    assert old.events == ["envelope 1 b'x'", "displaced"]
    assert new.events == ["envelope 2 None", "keys 3", "revoked"]


async def test_an_envelope_announced_on_one_node_reaches_the_device_on_another(
    nodes: Nodes,
) -> None:
    one, two = await nodes(2)
    sub, bystander = Sub(), Sub()
    two.subscribe("d", sub)
    two.subscribe("e", bystander)
    await asyncio.sleep(0.05)
    one.announce("d", 7, b"secret")
    one.keys_low("d", 4)
    await until(lambda: len(sub.events) == 2)
    # Across nodes the body may be dropped (on Redis it never travels).
    assert sub.events[0] in ("envelope 7 None", "envelope 7 b'secret'")
    assert sub.events[1] == "keys 4"
    assert bystander.events == []


async def test_displacement_and_revocation_cross_nodes(nodes: Nodes) -> None:
    one, two = await nodes(2)
    old, new = Sub(), Sub()
    one.subscribe("d", old)
    await asyncio.sleep(0.05)
    two.subscribe("d", new)  # the device moved to node two
    await until(lambda: old.events == ["displaced"])
    one.announce("d", 1)  # node one no longer routes to the displaced connection
    await until(lambda: len(new.events) == 1)
    one.revoke("d")
    await until(lambda: new.events[-1] == "revoked")
    assert old.events == ["displaced"]
    assert new.events == ["envelope 1 None", "revoked"]


async def test_no_envelope_body_crosses_redis() -> None:
    reason = await _redis_reachable()
    if reason is not None:
        pytest.skip(reason)
    bus = RedisBus(REDIS_URL, f"kluis-test-{secrets.token_hex(6)}")
    spy = aioredis.Redis.from_url(REDIS_URL)
    pubsub = spy.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(bus.channel)
    await bus.start()
    try:
        bus.announce("device-1", 42, b"ciphertext-body")
        message = None
        for _ in range(100):
            message = await pubsub.get_message(timeout=0.05)
            if message is not None:
                break
        assert message is not None
        assert message["data"] == f"env {bus.node} 42 device-1".encode()
    finally:
        await bus.close()
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await spy.aclose()


async def test_a_bus_keeps_its_subscriptions_when_redis_drops_the_connection() -> None:
    reason = await _redis_reachable()
    if reason is not None:
        pytest.skip(reason)
    prefix = f"kluis-test-{secrets.token_hex(6)}"
    one, two = RedisBus(REDIS_URL, prefix), RedisBus(REDIS_URL, prefix, max_backoff_s=0.2)
    await one.start()
    await two.start()
    admin = aioredis.Redis.from_url(REDIS_URL)
    try:
        sub = Sub()
        two.subscribe("d", sub)
        await until(lambda: bool(one.started and two.started))
        # Cut node two's subscription (only its own: other tests may share this Redis).
        clients = await admin.client_list(_type="pubsub")
        (victim,) = [c["id"] for c in clients if c.get("name") == f"kluis-bus-{two.node}"]
        await admin.client_kill_filter(_id=victim)
        # Until the listener is back, signals are lost (latency only); then they flow again.
        seq = 0

        def arrived() -> bool:
            nonlocal seq
            seq += 1
            one.announce("d", seq)
            return bool(sub.events)

        await until(arrived, timeout=10)
    finally:
        await one.close()
        await two.close()
        await admin.aclose()


async def test_an_unreachable_redis_is_a_typed_error_within_the_timeout() -> None:
    bus = RedisBus("redis://127.0.0.1:1/0", "kluis-test", connect_timeout_s=1.0)
    with pytest.raises(RedisBusError, match="does not answer"):
        await asyncio.wait_for(bus.start(), 5)
    with pytest.raises(RedisBusError):
        RedisBus("http://127.0.0.1:6379")
