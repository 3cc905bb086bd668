"""Operating a real ``kluis serve``: /healthz, /readyz when the store or Redis goes away, and
/metrics on its own loopback port after two real clients exchanged messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_postgres_server import PostgresServerProcess
from tests.kluis_testing import ServerProcess, free_port, register
from tests.postgres import ADMIN_URL, scratch_database


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read().decode()


async def aget(url: str) -> tuple[int, str]:
    return await asyncio.to_thread(get, url)


async def until(probe: Callable[[], object], want: object, within: float = 15) -> None:
    """Poll ``probe`` (sync, run in a thread) until it returns ``want``."""
    deadline = time.monotonic() + within
    got: object = None
    while time.monotonic() < deadline:
        got = await asyncio.to_thread(probe)
        if got == want:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"still {got!r}, wanted {want!r}")


def samples(text: str) -> dict[str, float]:
    """name{labels} -> value (labels sorted), from the exposition text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


# ---- health ----------------------------------------------------------------------------------


def test_healthz_and_readyz_on_a_node_and_no_metrics_on_the_public_port(
    server: ServerProcess,
) -> None:
    assert get(server.url + "/healthz") == (200, '{"status": "ok"}')
    assert get(server.url + "/health") == (200, '{"status": "ok"}')  # the old name stays
    status, body = get(server.url + "/readyz")
    assert (status, json.loads(body)) == (200, {"status": "ready"})
    assert get(server.url + "/metrics")[0] == 404


class TcpProxy:
    """A loopback TCP relay to ``target`` that can be cut (every relayed connection closed,
    the port shut) and put back on the same port: a database that becomes unreachable."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    @property
    def running(self) -> bool:
        return self._server is not None

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


def _postgres_target() -> tuple[str, int]:
    rest = ADMIN_URL.split("@", 1)[1].split("/", 1)[0]
    host, _, port = rest.partition(":")
    return host, int(port or 5432)


@pytest.fixture
def pg_url() -> Iterator[str]:
    with scratch_database() as url:  # synchronous: it must not run inside the test's loop
        yield url


@pytest.fixture
async def proxied_pg_node(
    pg_url: str, tmp_path: Path
) -> AsyncIterator[tuple[PostgresServerProcess, TcpProxy]]:
    proxy = TcpProxy(_postgres_target())
    await proxy.start()
    host_part = pg_url.split("@", 1)[1].split("/", 1)[0]
    node = PostgresServerProcess(
        tmp_path / "server", pg_url.replace(host_part, f"127.0.0.1:{proxy.port}")
    )
    try:
        await asyncio.to_thread(node.start)  # the proxy runs on this loop meanwhile
        yield node, proxy
    finally:
        await asyncio.to_thread(node.stop)
        if proxy.running:
            await proxy.cut()


async def test_readyz_is_503_naming_the_store_while_postgres_is_unreachable(
    proxied_pg_node: tuple[PostgresServerProcess, TcpProxy],
) -> None:
    node, proxy = proxied_pg_node
    assert await aget(node.url + "/readyz") == (200, '{"status": "ready"}')
    await proxy.cut()

    def store_state() -> object:
        status, body = get(node.url + "/readyz")
        return status, json.loads(body).get("failed", {}).get("store")

    await until(store_state, (503, "error"))
    body = (await aget(node.url + "/readyz"))[1]
    answer = json.loads(body)
    assert answer["code"] == "not_ready" and "store" in answer["message"]
    assert str(proxy.port) not in body  # nothing of the driver's error text
    assert await aget(node.url + "/healthz") == (200, '{"status": "ok"}')  # alive all the same

    await proxy.start()  # the database is back: the node is ready again, without a restart
    await until(lambda: get(node.url + "/readyz")[0], 200)


class PrivateRedis:
    """A redis-server of this test's own (no persistence) that the test can stop."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def redis_node(tmp_path: Path) -> Iterator[tuple[ServerProcess, PrivateRedis]]:
    if not any(
        os.access(os.path.join(d, "redis-server"), os.X_OK)
        for d in os.environ.get("PATH", "").split(os.pathsep)
    ):
        pytest.skip("redis-server is not installed")
    redis = PrivateRedis()
    redis.start()
    node = ServerProcess(tmp_path / "server", "--redis", redis.url)
    try:
        node.start()
        yield node, redis
    finally:
        node.stop()
        redis.stop()


async def test_readyz_is_503_naming_redis_while_redis_is_down(
    redis_node: tuple[ServerProcess, PrivateRedis],
) -> None:
    node, redis = redis_node
    assert await aget(node.url + "/readyz") == (200, '{"status": "ready"}')
    await asyncio.to_thread(redis.stop)

    def failed() -> object:
        status, body = get(node.url + "/readyz")
        return status, json.loads(body).get("failed")

    await until(failed, (503, {"redis": "error"}))  # the store is fine: only Redis is named
    await asyncio.to_thread(redis.start)  # same port, empty: nothing there had to survive
    await until(lambda: get(node.url + "/readyz")[0], 200)


# ---- metrics ---------------------------------------------------------------------------------


@pytest.fixture
def metered(tmp_path: Path) -> Iterator[tuple[ServerProcess, int]]:
    port = free_port()
    node = ServerProcess(tmp_path / "server", "--metrics-port", str(port))
    node.start()
    try:
        yield node, port
    finally:
        node.stop()


async def test_metrics_move_with_a_real_exchange_and_name_no_account_or_device(
    metered: tuple[ServerProcess, int], tmp_path: Path
) -> None:
    node, port = metered
    scrape = f"http://127.0.0.1:{port}/metrics"
    before = samples((await aget(scrape))[1])
    assert before["kluis_connections_open"] == 0
    assert before.get("kluis_envelopes_deposited_total") == 0

    alice = await register(node, tmp_path / "alice")
    bob = await register(node, tmp_path / "bob")
    try:
        for i in range(3):
            await alice.send(bob.account_id, f"hello {i}")
        assert len(await bob.receive(wait=5, until=3)) == 3
        await bob.send(alice.account_id, "and back")
        assert [m.text for m in await alice.receive(wait=5, until=1)] == ["and back"]
        status, text = await aget(scrape)
        assert status == 200
        during = samples(text)
        assert during["kluis_connections_open"] == 2
        ids = [alice.account_id, bob.account_id, alice.core.device_id, bob.core.device_id]
        # No account, device or address appears anywhere, even as a label.
        for secret in [*ids, "127.0.0.1"]:
            assert secret not in text
    finally:
        await alice.close()
        await bob.close()

    def settled() -> object:
        now = samples(get(scrape)[1])
        return now["kluis_connections_open"], now["kluis_envelopes_acked_total"] >= 4

    await until(settled, (0, True))
    after = samples((await aget(scrape))[1])
    assert after['kluis_logins_total{kind="register"}'] == 2
    assert after["kluis_send_seconds_count"] >= 4  # 4 texts, plus receipts and key traffic
    assert after["kluis_envelopes_deposited_total"] >= 4
    assert after["kluis_envelopes_delivered_total"] >= 4
    assert after["kluis_push_seconds_count"] >= 1  # live deliveries to the online receiver
    assert after['kluis_store_call_seconds_count{call="write_envelopes"}'] >= 1
    assert after["process_resident_memory_bytes"] > 0


def test_metrics_need_a_token_beyond_loopback(tmp_path: Path) -> None:
    args = ["serve", "--data", str(tmp_path), "--port", str(free_port())]
    args += ["--metrics-host", "0.0.0.0", "--metrics-port", str(free_port())]
    out = subprocess.run(
        [sys.executable, "-m", "kluis.apps.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: local_protocol: metrics on 0.0.0.0 (not loopback) need a token: set"
        " KLUIS_METRICS_TOKEN or metrics_token in the config file"
    ]


def test_the_metrics_token_from_the_environment_guards_the_scrape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    node = ServerProcess(tmp_path / "server", "--metrics-port", str(port))
    with monkeypatch.context() as env:
        env.setenv("KLUIS_METRICS_TOKEN", "t0ken")  # inherited by the server process
        node.start()
    try:
        scrape = f"http://127.0.0.1:{port}/metrics"
        assert get(scrape)[0] == 401
        status, text = get(scrape, {"Authorization": "Bearer t0ken"})
        assert status == 200 and "kluis_connections_open 0.0" in text
    finally:
        node.stop()


# ---- configuration ---------------------------------------------------------------------------


def test_serve_reads_file_then_environment_then_command_line(tmp_path: Path) -> None:
    file_port, env_port, file_metrics, cli_metrics = (free_port() for _ in range(4))
    config = tmp_path / "kluis.toml"
    config.write_text(
        f'data = "{tmp_path / "server"}"\nport = {file_port}\nmetrics_port = {file_metrics}\n'
        "[limits]\nmailbox_quota = 5\n"
    )
    env = {**os.environ, "KLUIS_PORT": str(env_port)}  # beats the file's port
    log = (tmp_path / "server.log").open("wb")
    args = ["serve", "--config", str(config), "--metrics-port", str(cli_metrics)]  # beats file
    proc = subprocess.Popen(
        [sys.executable, "-m", "kluis.apps.cli", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 15
        while get_or_none(f"http://127.0.0.1:{env_port}/healthz") != 200:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the node did not start"
            time.sleep(0.05)
        assert get(f"http://127.0.0.1:{cli_metrics}/metrics")[0] == 200
        assert get_or_none(f"http://127.0.0.1:{file_port}/healthz") is None
        assert get_or_none(f"http://127.0.0.1:{file_metrics}/metrics") is None
        assert (tmp_path / "server" / "kluis.sqlite3").exists()  # data from the file
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()

    config.write_text(config.read_text().replace("mailbox_quota", "mailbox_qouta"))
    out = subprocess.run(
        [sys.executable, "-m", "kluis.apps.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "unknown limit 'mailbox_qouta'" in out.stderr


def get_or_none(url: str) -> int | None:
    """The status, or None when nothing listens there."""
    try:
        return get(url)[0]
    except OSError:
        return None
