"""A deployment of three real ``kluis serve`` nodes (one PostgreSQL database, Redis between them)
behind a loopback TCP balancer, and what happens when a node dies, drains or Redis restarts.

Every test runs real node processes on loopback ports; clients register at the balancer's URL
(every node's ``--public-url``) and are kept connected by ``client/reconnect.py``. Delivery is
checked by texts and message IDs: every message a sender saw accepted arrives exactly once;
one the sender could not tell about (kept in its outbox when the connection dropped under it)
may arrive, once, later.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from kluis.client.client import KluisClient
from kluis.client.reconnect import ReconnectingSession
from kluis.client.transport import Transport, WebSocketTransport
from kluis.errors import TransportError
from kluis.protocol import frames as f
from tests.cluster import (
    FAST,
    Cluster,
    RedisServer,
    Tally,
    cluster_of,
    join,
    redis_or_skip,
    send_stream,
    until,
)
from tests.kluis_testing import RawConnection
from tests.loadbalancer import Balancer


@pytest.fixture
def three(tmp_path: Path) -> Iterator[Cluster]:
    redis_or_skip()
    with cluster_of(tmp_path, 3) as cluster:
        yield cluster


def check_exactly_once(tallies: list[Tally], ids: list[str]) -> None:
    """Each client got every text accepted for it, once, and nothing that was never sent."""
    for me, tally in zip(ids, tallies, strict=True):
        accepted = [t for s in tallies for t in s.accepted.get(me, [])]
        unsure = [t for s in tallies for t in s.unsure.get(me, [])]
        got = tally.texts()
        assert len(got) == len(set(got)), "a message was delivered twice"
        assert len({m for m, _ in tally.received}) == len(tally.received)
        assert set(accepted) <= set(got), f"lost: {sorted(set(accepted) - set(got))}"
        assert set(got) <= set(accepted) | set(unsure)


async def test_three_nodes_carry_one_to_one_and_group_messages(
    three: Cluster, tmp_path: Path
) -> None:
    async with Balancer(three.backends, port=three.public_port) as lb:
        clients: list[KluisClient] = []
        try:
            for i in range(6):  # round-robin: two clients on each node
                clients.append(await join(three, tmp_path / f"c{i}"))
            assert sorted(lb.active.values()) == [2, 2, 2]
            ids = [c.account_id for c in clients]
            for i, client in enumerate(clients):  # a ring: each to the next, on another node
                await client.send(ids[(i + 1) % 6], f"hello from {i}")
            for i, client in enumerate(clients):
                got = await client.receive(wait=5, until=1)
                assert [m.text for m in got] == [f"hello from {(i - 1) % 6}"]
            group = await clients[0].create_group("all nodes", ids[1:])
            await clients[0].send_group(group.id, "to everyone")
            for client in clients[1:]:
                await client.receive(wait=5, until=1)  # the group's creation
            await clients[4].send_group(group.id, "and back")
            want = ["to everyone", "and back"]
            for client in clients:
                for _ in range(20):
                    if set(want) <= {m.text for m in client.history(group.id)}:
                        break
                    await client.receive(wait=0.5)
                texts = [m.text for m in client.history(group.id) if m.text in want]
                assert sorted(texts) == sorted(want)  # each once, on every node
        finally:
            for client in clients:
                await client.close()


async def test_a_device_that_moves_to_another_node_is_displaced_on_the_old_one(
    three: Cluster, tmp_path: Path
) -> None:
    one, two, _ = three.nodes
    mover = await join(three, tmp_path / "mover", via=one.url)
    peer = await join(three, tmp_path / "peer", via=two.url)
    raw: RawConnection | None = None
    try:
        assert await mover.receive() == []
        # The same device logs in on node two (a new network, the old socket not dead yet).
        raw = await RawConnection.open(two)
        await raw.send(
            f.encode(f.Auth(rid=1, device=mover.core.device_id, sig=raw.login_sig(mover)))
        )
        assert isinstance(await raw.recv(), f.Welcome)
        # Node one hears it over Redis and closes the old connection (1008, replaced).
        with pytest.raises(TransportError) as info:
            await mover.receive(wait=5)
        assert info.value.details.get("close_code") == 1008
        # What is sent to the device now reaches its new connection, on node two.
        await peer.send(mover.account_id, "to the new place")
        deliver = await _next_deliver(raw.ws)
        assert len(deliver.envelopes) >= 1
    finally:
        if raw is not None:
            await raw.close()
        await mover.close()
        await peer.close()


async def _next_deliver(ws: aiohttp.ClientWebSocketResponse) -> f.Deliver:
    async with asyncio.timeout(5):
        while True:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.BINARY, msg
            frame = f.decode_server_frame(msg.data)
            if isinstance(frame, f.Deliver):
                return frame


async def _clients_with_sessions(
    cluster: Cluster, tmp_path: Path, count: int
) -> tuple[list[KluisClient], list[ReconnectingSession], list[Tally]]:
    clients: list[KluisClient] = []
    sessions: list[ReconnectingSession] = []
    tallies: list[Tally] = []
    for i in range(count):
        client = await join(cluster, tmp_path / f"c{i}")
        tally = Tally()
        session = ReconnectingSession(client, FAST, on_event=tally.on_event)
        session.start()
        clients.append(client)
        sessions.append(session)
        tallies.append(tally)
    for session in sessions:
        await session.wait_connected(5)
    return clients, sessions, tallies


async def _close_all(clients: list[KluisClient], sessions: list[ReconnectingSession]) -> None:
    for session in sessions:
        await session.stop()
    for client in clients:
        await client.close()


async def test_a_node_killed_mid_stream_its_clients_reconnect_and_nothing_is_lost(
    three: Cluster, tmp_path: Path
) -> None:
    victim = three.nodes[0]
    async with Balancer(three.backends, port=three.public_port) as lb:
        clients, sessions, tallies = await _clients_with_sessions(three, tmp_path, 6)
        try:
            ids = [c.account_id for c in clients]
            on_victim = lb.active[("127.0.0.1", victim.port)]
            assert on_victim == 2  # clients 0 and 3: each sends and receives
            streams = _streams(sessions, tallies, ids)
            await until(lambda: sum(len(t.received) for t in tallies) >= 60, 15, "the stream")
            before = [sum(map(len, t.accepted.values())) for t in tallies]
            victim.kill()  # SIGKILL, in the middle of it
            await asyncio.gather(*streams)
            moved = [s for s in sessions if s.downs]
            assert len(moved) == on_victim  # exactly the victim's clients lost their connection
            for i, session in enumerate(sessions):  # and they went on sending from elsewhere
                if session in moved:
                    assert sum(map(len, tallies[i].accepted.values())) > before[i]
            await until(lambda: all(s.connected for s in sessions), 10, "reconnection")
            assert all(s.connections == 2 for s in moved)
            assert lb.active[("127.0.0.1", victim.port)] == 0
            await until(lambda: _all_in(tallies, ids), 15, "every accepted message")
            await asyncio.sleep(0.3)  # a duplicate, if any, would come now
            check_exactly_once(tallies, ids)
            assert sum(len(t.accepted.get(ids[(i + 1) % 6], [])) for i, t in enumerate(tallies))
        finally:
            await _close_all(clients, sessions)


def _streams(
    sessions: list[ReconnectingSession], tallies: list[Tally], ids: list[str]
) -> list[asyncio.Task[None]]:
    """Client i sends 40 messages, one every 20 ms, to client i + 1 (in a ring)."""
    return [
        asyncio.create_task(
            send_stream(
                sessions[i],
                tallies[i],
                ids[(i + 1) % len(ids)],
                [f"{i}:{n}" for n in range(40)],
                interval=0.02,
            )
        )
        for i in range(len(ids))
    ]


def _all_in(tallies: list[Tally], ids: list[str]) -> bool:
    for me, tally in zip(ids, tallies, strict=True):
        want = {t for s in tallies for t in s.accepted.get(me, [])}
        if not want <= set(tally.texts()):
            return False
    return True


async def test_sigterm_drains_a_node_its_clients_move_at_once_and_lose_nothing(
    three: Cluster, tmp_path: Path
) -> None:
    """URL rotation instead of the balancer: each client knows the three node URLs."""
    victim = three.nodes[1]
    urls = [node.url for node in three.nodes]
    clients: list[KluisClient] = []
    sessions: list[ReconnectingSession] = []
    tallies: list[Tally] = []
    try:
        for i in range(6):
            client = await join(three, tmp_path / f"c{i}", via=urls[i % 3])
            tally = Tally()
            # Client i starts at node i % 3 (random() picks the start among the endpoints).
            session = ReconnectingSession(
                client, FAST, endpoints=urls, on_event=tally.on_event, random=_fixed(i % 3 + 0.5)
            )
            assert session.url == urls[i % 3]
            session.start()
            clients.append(client)
            sessions.append(session)
            tallies.append(tally)
        for session in sessions:
            await session.wait_connected(5)
        ids = [c.account_id for c in clients]
        streams = _streams(sessions, tallies, ids)
        await until(lambda: sum(len(t.received) for t in tallies) >= 60, 15, "the stream")
        proc = three.terminate(victim)  # SIGTERM, in the middle of it
        assert await asyncio.to_thread(proc.wait, 10) == 0  # drained, then exited cleanly
        victim.proc = None
        await asyncio.gather(*streams)
        moved = [s for s in sessions if s.downs]
        assert moved == [sessions[1], sessions[4]]
        # Told to go (1001), not cut off: they came back elsewhere without back-off.
        assert all(s.downs[0].close_code == 1001 for s in moved), [s.downs for s in moved]
        assert all(s.backoff.attempt == 0 for s in moved)
        await until(lambda: all(s.connected for s in sessions), 10, "reconnection")
        assert all(s.url != victim.url for s in moved)
        await until(lambda: _all_in(tallies, ids), 15, "every accepted message")
        await asyncio.sleep(0.3)
        check_exactly_once(tallies, ids)
    finally:
        await _close_all(clients, sessions)


def _fixed(thirds: float) -> Callable[[], float]:
    """A "random" source that always answers ``thirds / 3``."""
    return lambda: thirds / 3


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    try:
        server.start()
    except FileNotFoundError:
        pytest.skip("redis-server is not installed")
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def two_on_private_redis(private_redis: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    with cluster_of(tmp_path, 2, redis_url=private_redis.url, licences=2) as cluster:
        yield cluster


async def test_redis_restarted_mid_stream_delivery_across_nodes_resumes(
    two_on_private_redis: Cluster, private_redis: RedisServer, tmp_path: Path
) -> None:
    two = two_on_private_redis
    one_url, two_url = two.nodes[0].url, two.nodes[1].url
    sender = await join(two, tmp_path / "sender", via=one_url)
    receiver = await join(two, tmp_path / "receiver", via=two_url)
    tallies = [Tally(), Tally()]
    sessions = [
        ReconnectingSession(sender, FAST, endpoints=[one_url], on_event=tallies[0].on_event),
        ReconnectingSession(receiver, FAST, endpoints=[two_url], on_event=tallies[1].on_event),
    ]
    for session in sessions:
        session.start()
    try:
        to = receiver.account_id

        async def stream(texts: list[str]) -> None:
            await send_stream(sessions[0], tallies[0], to, texts, interval=0.02)

        await stream([f"before {n}" for n in range(15)])
        await until(lambda: len(tallies[1].received) == 15, 5, "delivery over Redis")
        private_redis.kill()  # SIGKILL: every signal published now is lost
        await stream([f"during {n}" for n in range(15)])
        # Nothing of it crossed to node two: no signal, and the receiver reads on signals.
        assert not [t for t in tallies[1].texts() if t.startswith("during")]
        await asyncio.to_thread(private_redis.start)  # the same port, empty
        # The nodes subscribe again on their own, with back-off: keep the stream going
        # until it is all delivered (the receiver stays on its one connection).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        n = 0
        while not set(tallies[0].accepted[to]) <= set(tallies[1].texts()):
            assert loop.time() < deadline, "delivery did not resume after the restart"
            await stream([f"after {n}"])
            n += 1
            await asyncio.sleep(0.1)
        assert len(tallies[0].accepted[to]) == 30 + n  # nodes kept accepting meanwhile
        # Delivered live across nodes: the receiver never reconnected.
        assert sessions[1].connections == 1 and not sessions[1].downs
        await asyncio.sleep(0.3)
        check_exactly_once(tallies, [sender.account_id, receiver.account_id])
        # And a new message after the restart reaches the other node at once.
        await stream(["last one"])
        await until(lambda: "last one" in tallies[1].texts(), 5, "the last message")
    finally:
        await _close_all([sender, receiver], sessions)


def test_serve_refuses_a_bad_drain_timeout(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kluis.apps.cli",
            "serve",
            "--data",
            str(tmp_path),
            "--drain-timeout",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "--drain-timeout" in out.stderr


async def test_a_hung_node_is_left_for_another_when_its_heartbeat_goes_unanswered(
    three: Cluster, tmp_path: Path
) -> None:
    """SIGSTOP: the node sends no FIN; only the client's heartbeat tells it to go elsewhere."""
    urls = [node.url for node in three.nodes]
    victim = three.nodes[0]
    client = await join(three, tmp_path / "client", via=urls[0])
    peer = await join(three, tmp_path / "peer", via=urls[1])
    await client.disconnect()  # from now on through the session, with a heartbeat
    tally = Tally()

    def beating(url: str) -> Transport:
        return WebSocketTransport(url, heartbeat=0.5, timeout=3)

    session = ReconnectingSession(
        client,
        FAST,
        endpoints=urls,
        transport_factory=beating,
        on_event=tally.on_event,
        random=_fixed(0.5),  # starts at the first URL: the node about to hang
    )
    assert victim.proc is not None
    pid = victim.proc.pid
    session.start()
    try:
        await session.wait_connected(5)
        os.kill(pid, signal.SIGSTOP)
        await until(lambda: bool(session.downs), 5, "the heartbeat to notice")
        await session.wait_connected(10)
        assert session.url != urls[0] and session.connections == 2
        await peer.send(client.account_id, "after the hang")
        await until(lambda: "after the hang" in tally.texts(), 5, "delivery on the new node")
    finally:
        os.kill(pid, signal.SIGCONT)
        await session.stop()
        await client.close()
        await peer.close()
