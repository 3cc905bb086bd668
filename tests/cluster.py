"""Test helpers for a deployment of several nodes: real ``kluis serve`` processes on one scratch
PostgreSQL database, routing over Redis (the shared one with a per-test prefix, or a private
``redis-server``), all named by one ``--public-url``: the loopback balancer's
(``tests/loadbalancer.py``), which the test starts on the port reserved here.

Clients register through the balancer's URL, as they would behind HAProxy; a
:class:`~kluis.client.reconnect.ReconnectingSession` keeps them connected, and a :class:`Tally`
records what each sent (accepted, or not seen accepted) and what each received, so that a test
can say "every accepted message was delivered exactly once".
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kluis.client.backoff import BackoffPolicy
from kluis.client.client import KluisClient
from kluis.client.events import Event, MessageReceived
from kluis.client.reconnect import ReconnectingSession
from kluis.client.records import Message
from kluis.client.transport import Transport, TransportFactory, WebSocketTransport
from kluis.errors import TransportError
from tests.integration.test_postgres_server import PostgresServerProcess
from tests.kluis_testing import PASSPHRASE, fast_kdf, free_port
from tests.postgres import scratch_database
from tests.redis_testing import drop_prefix
from tests.test_delivery_redis import REDIS_URL, _redis_reachable

# Quick to come back in tests: the first retry within 0.2 s, never more than 2 s apart.
FAST = BackoffPolicy(base_s=0.2, cap_s=2.0, stable_after_s=1.0, going_away_spread_s=0.2)


@dataclass
class Cluster:
    nodes: list[PostgresServerProcess]
    database_url: str
    public_port: int  # where the test starts its Balancer: every node's --public-url
    blob_dir: Path  # every node's --blob-dir (one folder, as an NFS mount would be)
    codes: list[str] = field(default_factory=list)  # licence codes, one per client

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.public_port}"

    @property
    def backends(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", node.port) for node in self.nodes]

    def code(self) -> str:
        return self.codes.pop()

    def terminate(self, node: PostgresServerProcess) -> subprocess.Popen[bytes]:
        """SIGTERM (the drain); the process, to wait for."""
        assert node.proc is not None
        proc = node.proc
        proc.terminate()
        return proc


def redis_or_skip() -> None:
    reason = asyncio.run(_redis_reachable())
    if reason is not None:
        pytest.skip(reason)


def start_all(nodes: list[PostgresServerProcess]) -> None:
    """Start the nodes side by side (each waits for its own /health)."""
    errors: list[BaseException] = []

    def start(node: PostgresServerProcess) -> None:
        try:
            node.start()
        except BaseException as exc:  # re-raised by the caller, in its thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


@contextmanager
def cluster_of(
    root: Path,
    count: int,
    *,
    redis_url: str = REDIS_URL,
    licences: int = 12,
    drain_timeout: float = 5.0,
) -> Iterator[Cluster]:
    """``count`` nodes on a scratch database, a fresh Redis prefix and one attachment folder;
    stopped at the end."""
    prefix = f"kluis-test-{secrets.token_hex(6)}"
    public_port = free_port()
    blob_dir = root / "shared-blobs"
    with scratch_database() as url:
        nodes = [PostgresServerProcess(root / f"node-{i}", url) for i in range(count)]
        for node in nodes:
            node.extra_args += [
                "--redis",
                redis_url,
                "--redis-prefix",
                prefix,
                "--public-url",
                f"http://127.0.0.1:{public_port}",
                "--drain-timeout",
                str(drain_timeout),
                "--blob-dir",
                str(blob_dir),
            ]
        cluster = Cluster(nodes, url, public_port, blob_dir)
        try:
            start_all(nodes)
            if licences:
                cluster.codes = nodes[0].licences(licences)
            yield cluster
        finally:
            for node in nodes:
                node.kill()
            drop_prefix(redis_url, prefix)


class RedisServer:
    """A private ``redis-server`` on a free loopback port: no snapshot, no append-only file."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.proc.returncode})")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


def dial(url: str) -> TransportFactory:
    """A transport factory that dials ``url`` whatever the profile says (one given node)."""

    def make(_server: str) -> Transport:
        return WebSocketTransport(url)

    return make


async def join(cluster: Cluster, profile: Path, *, via: str | None = None) -> KluisClient:
    """Register a new account at the deployment's public URL, through ``via`` (default: the
    balancer at that URL)."""
    factory = dial(via) if via is not None else WebSocketTransport
    return await KluisClient.register(
        cluster.public_url,
        cluster.code(),
        profile,
        PASSPHRASE,
        transport_factory=factory,
        kdf=fast_kdf(),
    )


@dataclass
class Tally:
    """One client's traffic: texts it sent, by recipient, and what it received."""

    accepted: dict[str, list[str]] = field(default_factory=dict)  # recipient -> texts
    # Not seen accepted: NotSent (kept in the outbox, it goes at the next login), or the
    # connection failed after the Send (a receipt flushed after it): it may arrive, once.
    unsure: dict[str, list[str]] = field(default_factory=dict)
    received: list[tuple[bytes, str]] = field(default_factory=list)  # (message id, text)

    def on_event(self, event: Event) -> None:
        if isinstance(event, MessageReceived):
            self.received.append((event.message.id, event.message.text))

    def texts(self) -> list[str]:
        return [text for _, text in self.received]


async def send_stream(
    session: ReconnectingSession,
    tally: Tally,
    to: str,
    texts: list[str],
    *,
    interval: float,
    timeout: float = 15.0,
) -> None:
    """Send ``texts`` one by one to ``to`` through the session, across drops: the accepted ones
    and the others (``Tally.unsure``) are recorded apart."""
    for text in texts:

        async def send(client: KluisClient, text: str = text) -> Message:
            return await client.send(to, text)

        try:
            await session.call(send, timeout=timeout)
        except TransportError:  # NotSent included; a session that never comes back fails later
            tally.unsure.setdefault(to, []).append(text)
        else:
            tally.accepted.setdefault(to, []).append(text)
        await asyncio.sleep(interval)


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check()`` every 50 ms; fail the test naming ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)
