"""The server's default log, after a busy workload, names no one and quotes nothing.

Workload: registration, a refused licence, device linking and revocation, messages both ways,
bad frames, an oversized frame, malformed HTTP, unknown paths, a dropped connection. Then the log
(everything the server wrote to stdout and stderr, at its default level) must hold no message
text, no account or device ID, no licence code or link token, and no IP address other than the
address the server itself listens on.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp

from kluis.client.client import KluisClient
from kluis.errors import KluisError
from kluis.protocol import frames as f
from tests.kluis_testing import ServerProcess, link_device, register

SECRET_TEXT = "log-privacy-marker-9d1f"
IP = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b|\[?(?:[0-9a-fA-F]{0,4}:){2,7}[0-9a-fA-F]{0,4}\]?")


async def noisy_clients(server: ServerProcess) -> None:
    # Malformed HTTP, an unknown path, a WebSocket route hit without an upgrade.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"BREW /pot HTTP/9.9\r\n\x00\x01\r\n\r\n")
    await writer.drain()
    await reader.read(1000)
    writer.close()
    for path in ("/nope", "/v1/ws", "/v1/ws?token=" + SECRET_TEXT):
        with contextlib.suppress(urllib.error.HTTPError):
            urllib.request.urlopen(server.url + path, timeout=5).close()
    # Garbage and an oversized frame on a WebSocket, then a rude disconnect.
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.url + "/v1/ws", max_msg_size=0)
        await ws.receive()
        await ws.send_bytes(b"\xc1" + SECRET_TEXT.encode())
        await ws.receive()
        # The server may cut the connection while the frame is still being written.
        with contextlib.suppress(ConnectionError, aiohttp.ClientError):
            await ws.send_bytes(bytes(2 * 1024 * 1024))
            await ws.receive()
        await ws.close()


async def test_logs_hold_no_message_data_ids_or_addresses(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    alice2 = await link_device(alice, server, tmp_path / "alice2")
    with contextlib.suppress(KluisError):  # a refused licence
        await KluisClient.register(server.url, "AAAA-BBBB", tmp_path / "nolicence", "pw")
    await alice.send(bob.account_id, SECRET_TEXT)
    await bob.send(alice.account_id, SECRET_TEXT + " reply")
    assert len(await bob.receive(wait=5, until=1)) == 1
    assert len(await alice2.receive(wait=5, until=2)) == 2
    await alice.revoke(alice2.core.device_id)
    await noisy_clients(server)
    ids = {
        alice.account_id,
        bob.account_id,
        alice.core.device_id,
        bob.core.device_id,
        alice2.core.device_id,
    }
    for c in (alice, bob, alice2):
        await c.close()
    server.stop()  # shutdown messages count too

    log = server.log_path.read_text()
    assert "listening on" in log  # the log is the one we think it is
    assert SECRET_TEXT not in log
    for ident in ids:
        assert ident not in log
        assert ident[:12] not in log  # nor a shortened form
    for line in log.splitlines():
        if "listening on" in line:
            continue  # the server's own bind address
        assert not IP.search(line.split(" ", 2)[-1]), line  # after the timestamp
    assert "Traceback" not in log
    # Frames in the log would show as msgpack reprs or tags.
    assert "envelopes" not in log and f.Send.__struct_config__.tag not in log.split()
