"""Test helpers: a Kluis server in this process (joined in memory) or a real server process
on loopback, and real clients of either."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from functools import partial
from pathlib import Path

import aiohttp

from kluis.client.client import KluisClient
from kluis.client.transport import MemoryTransport, TransportFactory, WebSocketTransport
from kluis.crypto.profile_key import KdfParams, new_params
from kluis.protocol import frames as f
from kluis.server.config import Limits, ServerConfig
from kluis.server.inprocess import InProcessServer, open_inprocess_server

PASSPHRASE = "correct horse battery staple"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`kluis serve` in a subprocess, on a free loopback port, with its own data folder."""

    def __init__(self, data: Path, *extra_args: str) -> None:
        self.data = data
        self.port = free_port()
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data.parent / f"{data.name}-server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "kluis.apps.cli", *args]

    def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                self.cli(
                    "serve", "--data", str(self.data), "--port", str(self.port), *self.extra_args
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def kill(self) -> None:
        """kill -9: no chance to flush or clean up."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def licences(self, count: int = 1, days: int = 182) -> list[str]:
        out = subprocess.run(
            self.cli(
                "licence",
                "create",
                "--init",
                "--data",
                str(self.data),
                "--count",
                str(count),
                "--days",
                str(days),
            ),
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.split()


Server = ServerProcess | InProcessServer


async def start_inprocess(data: Path, limits: Limits | None = None) -> InProcessServer:
    """A server application in this process; close it with ``await server.close()``."""
    data.mkdir(parents=True, exist_ok=True)
    return await open_inprocess_server(ServerConfig(data_dir=data, limits=limits or Limits()))


def transport_factory(server: Server) -> TransportFactory:
    """In memory for an in-process server, a WebSocket for a server process."""
    if isinstance(server, InProcessServer):
        return partial(MemoryTransport, server)
    return WebSocketTransport


def data_dir(server: Server) -> Path:
    """The server's data folder (its database is ``kluis.sqlite3`` there)."""
    if isinstance(server, InProcessServer):
        return server.config.data_dir
    return server.data


async def licences(server: Server, count: int = 1) -> list[str]:
    if isinstance(server, InProcessServer):
        return await server.create_licences(count)
    return server.licences(count)


def open_profile(server: Server, profile: Path) -> KluisClient:
    """``KluisClient.open`` with the transport that reaches ``server`` (not connected yet)."""
    return KluisClient.open(profile, PASSPHRASE, transport_factory=transport_factory(server))


async def reconnect(server: Server, profile: Path) -> KluisClient:
    """Open an existing profile and connect it."""
    client = open_profile(server, profile)
    await client.connect()
    return client


def fast_kdf() -> KdfParams:
    """Cheap argon2id parameters for test profiles (about 20 ms to open instead of 250 ms). The
    tests of the KDF and of the CLI keep the defaults: ``ProfileStore`` and the CLI never lower
    them on their own."""
    return new_params(time_cost=1, memory_kib=8192)


async def register(server: Server, profile: Path) -> KluisClient:
    (code,) = await licences(server, 1)
    return await KluisClient.register(
        server.url,
        code,
        profile,
        PASSPHRASE,
        transport_factory=transport_factory(server),
        kdf=fast_kdf(),
    )


async def link_device(existing: KluisClient, server: Server, profile: Path) -> KluisClient:
    code = await KluisClient.request_link(
        server.url, profile, PASSPHRASE, transport_factory=transport_factory(server), kdf=fast_kdf()
    )
    await existing.approve(code)
    return await reconnect(server, profile)


class RawConnection:
    """A bare WebSocket speaking frames by hand, to send what a real client never would."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse):
        self.session, self.ws = session, ws
        self.nonce = b""
        self.server = ""  # the origin the server names in its challenge

    @classmethod
    async def open(cls, server: ServerProcess) -> RawConnection:
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(server.url + "/v1/ws", max_msg_size=0)
        raw = cls(session, ws)
        challenge = await raw.recv()
        assert isinstance(challenge, f.Challenge)
        raw.nonce, raw.server = challenge.nonce, challenge.server
        return raw

    async def recv(self, timeout: float = 5) -> f.ServerFrame:
        """The next answer, skipping pushes (deliveries and notices)."""
        while True:
            msg = await self.ws.receive(timeout=timeout)
            assert msg.type == aiohttp.WSMsgType.BINARY, msg
            frame = f.decode_server_frame(msg.data)
            if not isinstance(frame, f.Deliver | f.Synced | f.KeysLow):
                return frame

    def login_sig(self, client: KluisClient) -> str:
        """``client``'s device signing this connection's challenge."""
        return client.core.sign_challenge(self.nonce, self.server)

    async def send(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()
