"""Real ``kluis serve --database postgresql://... --redis redis://...`` nodes on one store and
one Redis prefix: what one node enforces, N nodes enforce together.

- rate limits: a device moving between nodes is refused at the total one node allows;
- mailbox quotas: deposits through two nodes fill one quota, not two;
- device lists: a revocation answered on node one is seen by a send on node two at once;
- presence: a device's key names its node while connected and lapses when the node is killed.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from kluis.client.client import KluisClient
from kluis.client.transport import WebSocketTransport
from kluis.protocol import frames as f
from kluis.server.accounts import Accounts
from kluis.server.config import Limits
from kluis.server.delivery.redis import _ONLINE
from kluis.server.store.postgres import PostgresStore
from tests.integration.test_postgres_server import PostgresServerProcess
from tests.kluis_testing import PASSPHRASE, RawConnection, fast_kdf, link_device
from tests.postgres import scratch_database
from tests.redis_testing import PrivateRedis
from tests.test_delivery_redis import REDIS_URL, _redis_reachable

Nodes = Callable[..., list[PostgresServerProcess]]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Nodes, str]]:
    """``nodes(n, "--limit", ...)``: n nodes on one scratch database and Redis prefix."""
    reason = asyncio.run(_redis_reachable())
    if reason is not None:
        pytest.skip(reason)
    prefix = f"kluis-test-{secrets.token_hex(6)}"
    started: list[PostgresServerProcess] = []
    with scratch_database() as url:

        def nodes(n: int, *args: str) -> list[PostgresServerProcess]:
            made = [PostgresServerProcess(tmp_path / f"node-{i}", url) for i in range(n)]
            for node in made:
                node.extra_args += ["--redis", REDIS_URL, "--redis-prefix", prefix, *args]
                started.append(node)
            with ThreadPoolExecutor(n) as pool:  # the nodes start side by side
                list(pool.map(PostgresServerProcess.start, made))
            return made

        try:
            yield nodes, prefix
        finally:
            for node in started:
                node.stop()
            with redis.Redis.from_url(REDIS_URL) as client:
                keys = list(client.scan_iter(match=f"{prefix}:*"))
                if keys:
                    client.delete(*keys)


async def register(node: PostgresServerProcess, profile: Path) -> KluisClient:
    """A new account on ``node``, its licence written straight into the shared store (the CLI
    in a subprocess costs seconds on a busy machine)."""
    store = PostgresStore(node.database_url, key_file=node.key_file)
    try:
        (code,) = await Accounts(store, time.time, Limits()).create_licences(1, 182)
    finally:
        await store.close()
    return await KluisClient.register(
        node.url, code, profile, PASSPHRASE, transport_factory=WebSocketTransport, kdf=fast_kdf()
    )


async def login(node: PostgresServerProcess, client: KluisClient) -> RawConnection:
    """A raw connection of ``client``'s device to ``node`` (it displaces any other)."""
    raw = await RawConnection.open(node)
    sig = client.core.sign_challenge(raw.nonce, raw.server)
    await raw.send(f.encode(f.Auth(rid=0, device=client.core.device_id, sig=sig)))
    welcome = await raw.recv()
    assert isinstance(welcome, f.Welcome), welcome
    return raw


async def send(raw: RawConnection, rid: int, account: str, devices: list[str]) -> f.ServerFrame:
    """An opaque envelope for each of ``devices`` of ``account``; the server's answer."""
    envelopes = [f.OutEnvelope(device=d, body=b"opaque") for d in devices]
    await raw.send(f.encode(f.Send.one(rid, account, envelopes)))
    return await raw.recv()


def outcome(answer: f.ServerFrame) -> str:
    return "done" if isinstance(answer, f.Done) else getattr(answer, "code", repr(answer))


async def alternate(
    nodes: list[PostgresServerProcess], sender: KluisClient, to: KluisClient, sends: int
) -> list[str]:
    """``sends`` sends from ``sender``'s device to ``to``'s, each through the next node (a new
    connection each time: the device moves)."""
    results = []
    for i in range(sends):
        raw = await login(nodes[i % len(nodes)], sender)
        try:
            results.append(outcome(await send(raw, i + 1, to.account_id, [to.core.device_id])))
        finally:
            await raw.close()
    return results


async def test_rate_limits_hold_across_nodes(cluster: tuple[Nodes, str], tmp_path: Path) -> None:
    nodes, _ = cluster
    limits = ["--limit", "send_burst=6", "--limit", "send_rate_per_s=0.001"]
    three = nodes(3, *limits)
    alice = await register(three[0], tmp_path / "alice")
    bob = await register(three[1], tmp_path / "bob")
    await alice.close()
    await bob.close()
    # One node allows a burst of 6; three nodes together allow the same 6, not 18.
    results = await alternate(three, alice, bob, 12)
    assert results == ["done"] * 6 + ["rate_limited"] * 6


async def test_a_mailbox_quota_holds_across_nodes(
    cluster: tuple[Nodes, str], tmp_path: Path
) -> None:
    nodes, prefix = cluster
    two = nodes(2, "--limit", "mailbox_quota=4")
    alice = await register(two[0], tmp_path / "alice")
    bob = await register(two[1], tmp_path / "bob")
    await alice.close()
    await bob.close()  # offline: everything waits in his mailbox
    # Each node counted alone would take 4 (after its first count in the store): 7 in all.
    results = await alternate(two, alice, bob, 9)
    assert results == ["done"] * 4 + ["quota_exceeded"] * 5
    # Redis loses the counter (evicted, restarted): the next node to use it counts the store.
    with redis.Redis.from_url(REDIS_URL) as client:
        assert client.delete(f"{prefix}:mq:{bob.core.device_id}") == 1
    await asyncio.sleep(1.1)  # past mailbox_full_recheck_s: each node asks Redis again
    assert await alternate(two, alice, bob, 2) == ["quota_exceeded"] * 2


async def test_a_revocation_on_one_node_refuses_the_device_on_another_at_once(
    cluster: tuple[Nodes, str], tmp_path: Path
) -> None:
    nodes, _ = cluster
    one, two = nodes(2)
    alice = await register(one, tmp_path / "alice")
    laptop = await link_device(alice, one, tmp_path / "alice-laptop")
    bob = await register(two, tmp_path / "bob")
    devices = [alice.core.device_id, laptop.core.device_id]
    await laptop.close()
    await bob.close()
    raw = await login(two, bob)
    try:
        # Node two reads, and caches, Alice's two devices.
        assert outcome(await send(raw, 1, alice.account_id, devices)) == "done"
        await alice.revoke(laptop.core.device_id)  # on node one
        refused = await send(raw, 2, alice.account_id, devices)  # at once, on node two
        assert isinstance(refused, f.Error) and refused.code == "mismatched_devices", refused
        assert [(m.account, m.missing, m.extra) for m in refused.mismatched] == [
            (alice.account_id, [], [laptop.core.device_id])
        ]
        assert outcome(await send(raw, 3, alice.account_id, devices[:1])) == "done"
    finally:
        await raw.close()
        await alice.close()


async def test_a_killed_nodes_devices_go_offline_with_their_ttl(
    cluster: tuple[Nodes, str], tmp_path: Path
) -> None:
    nodes, prefix = cluster
    one, two = nodes(2, "--limit", "presence_ttl_s=1", "--limit", "presence_refresh_s=0.2")
    alice = await register(one, tmp_path / "alice")
    bob = await register(two, tmp_path / "bob")
    spy = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    alice_key, bob_key = (f"{prefix}:on:{c.core.device_id}" for c in (alice, bob))
    try:
        await until(lambda: spy.exists(alice_key, bob_key), 2)
        owners = {await spy.get(alice_key), await spy.get(bob_key)}
        assert len(owners) == 2  # each names its own node
        await asyncio.sleep(1.5)  # past the TTL: refreshed while connected
        assert await spy.exists(alice_key, bob_key) == 2
        assert await online(spy, prefix) == 2
        one.kill()  # SIGKILL: no clean-up; the key lapses with its TTL
        await until(lambda: spy.exists(alice_key, bob_key), 1, timeout=5)
        assert await spy.exists(bob_key) == 1
        await until(lambda: online(spy, prefix), 1, timeout=5)
        await bob.close()  # a connection that ends takes its key with it
        await until(lambda: spy.exists(bob_key), 0, timeout=5)
    finally:
        await spy.aclose()
        await alice.close()
        await bob.close()


@pytest.fixture
def lone_node(tmp_path: Path) -> Iterator[tuple[PostgresServerProcess, PrivateRedis]]:
    """One node on a scratch database and a private Redis (which the test may stop)."""
    private = PrivateRedis()
    private.start()
    with scratch_database() as database:
        node = PostgresServerProcess(tmp_path / "node", database)
        node.extra_args += ["--redis", private.url, "--limit", "send_burst=3"]
        node.extra_args += ["--limit", "send_rate_per_s=0.001"]
        try:
            for attempt in range(50):
                try:
                    node.start()
                    break
                except RuntimeError:  # Redis not listening yet
                    if attempt == 49:
                        raise
                    time.sleep(0.1)
            yield node, private
        finally:
            node.stop()
            private.stop()


async def test_a_node_serves_on_its_own_limits_while_redis_is_down(
    lone_node: tuple[PostgresServerProcess, PrivateRedis], tmp_path: Path
) -> None:
    """Redis dies under a running node: sends go on, limited by the node's own bucket (fail
    open), and the log says so in one line that names no device."""
    node, private = lone_node
    alice = await register(node, tmp_path / "alice")
    bob = await register(node, tmp_path / "bob")
    await alice.close()
    await bob.close()
    raw = await login(node, alice)
    try:
        to = bob.account_id, [bob.core.device_id]
        assert [outcome(await send(raw, i, *to)) for i in (1, 2)] == ["done"] * 2
        private.stop()
        # The shared bucket had 1 token left; the node's own, unused, has 3.
        results = [outcome(await send(raw, i, *to)) for i in range(3, 7)]
        assert results == ["done"] * 3 + ["rate_limited"]
    finally:
        await raw.close()
    node.stop()
    log = node.log_path.read_text()
    assert log.count("redis state unavailable (ConnectionError)") == 1, log
    assert alice.core.device_id not in log and bob.core.device_id not in log


async def online(spy: aioredis.Redis, prefix: str) -> int:
    """The sum of the live nodes' counts, as ``RedisBus.online_devices`` reads it."""
    return int(await spy.eval(_ONLINE, 1, f"{prefix}:nodes"))


async def until(read: Callable[[], Awaitable[int]], value: int, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (current := await read()) != value:
        assert asyncio.get_running_loop().time() < deadline, f"{current} != {value}"
        await asyncio.sleep(0.05)
