"""The app's methods on a real `kluis daemon` process: bad frames get typed errors and the
connection goes on; requests of one connection do not wait for each other."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kluis.apps.app_rpc import MAX_REQUEST
from kluis.apps.tui.remote import DaemonBackend
from tests.integration.test_cli import kluis
from tests.integration.test_daemon import DaemonProcess
from tests.kluis_testing import ServerProcess


@pytest.fixture
def two(server: ServerProcess, tmp_path: Path) -> Iterator[tuple[Path, str, Path, str]]:
    """Profiles and IDs of alice and bob, registered with the CLI (passphrase pw-cli)."""
    codes = server.licences(2)
    a, b = tmp_path / "alice", tmp_path / "bob"
    alice = kluis("register", "--server", server.url, "--licence", codes[0], "--profile", str(a))
    bob = kluis("register", "--server", server.url, "--licence", codes[1], "--profile", str(b))
    yield a, alice.stdout.strip(), b, bob.stdout.strip()


class Raw:
    """A raw connection to the daemon's socket: lines out, answers by id back."""

    def __init__(self, profile: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(str(profile / "daemon.sock"))
        self.file = self.sock.makefile("rb")

    def send(self, line: bytes) -> None:
        self.sock.sendall(line + b"\n")

    def answer(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "the daemon closed the connection"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def call(method: str, params: object, rid: int) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}).encode()


def test_bad_frames_get_typed_errors_and_the_connection_goes_on(
    two: tuple[Path, str, Path, str],
) -> None:
    a, alice, _, bob = two
    daemon = DaemonProcess(a, "--lock-after", "60")
    try:
        daemon.wait_ready()
        raw = Raw(a)
        cases: list[tuple[bytes, int]] = [
            (b"{not json", -32700),
            (b"[1, 2]", -32600),
            (b'{"jsonrpc": "2.0", "id": 3, "method": 7}', -32600),
            (call("app.nope", {}, 4), -32601),
            (call("app.send", {"conversation": 5, "text": "x"}, 5), -32602),
            (call("app.send", {"conversation": bob, "text": "x", "cc": 1}, 6), -32602),
            (call("app.set_timer", {"conversation": bob, "seconds": "ten"}, 7), -32602),
            (call("app.history", ["positional"], 8), -32600),
            (call("app.attachment_bytes", {"ref": {"id": "x"}, "limit": 1}, 9), -32602),
            (call("app.send", {"conversation": "nobody", "text": "x"}, 10), -32000),
            (call("app.subscribe", {"x": 1}, 11), -32602),
            (b"x" * (MAX_REQUEST + 100), -32600),
            (
                call("app.send_file", {"conversation": bob, "path": "/no/such", "caption": ""}, 12),
                -32000,
            ),
        ]
        for line, code in cases:
            raw.send(line)
            answer = raw.answer()
            assert answer["error"]["code"] == code, (line[:80], answer)
            if line.startswith(b"xxx"):
                assert f"longer than {MAX_REQUEST} bytes" in answer["error"]["message"]
        # the same connection still answers, and nothing was sent or written meanwhile
        raw.send(call("whoami", {}, 20))
        assert raw.answer()["result"]["account"] == alice
        raw.send(call("app.history", {"conversation": bob}, 21))
        assert raw.answer() == {"jsonrpc": "2.0", "id": 21, "result": []}
        raw.close()
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.log.read_text()
    assert "Traceback" not in daemon.log.read_text()


def test_a_slow_request_does_not_hold_up_a_fast_one(
    two: tuple[Path, str, Path, str], tmp_path: Path
) -> None:
    a, alice, b, _ = two
    bin_dir = tmp_path / "bin"  # a notify-send that records that it ran
    bin_dir.mkdir()
    notified = tmp_path / "notified"
    (bin_dir / "notify-send").write_text(f'#!/bin/sh\necho "$@" >> {notified}\n')
    (bin_dir / "notify-send").chmod(0o755)
    daemon = DaemonProcess(a, "--lock-after", "60", env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    try:
        daemon.wait_ready()
        raw = Raw(a)
        started = time.monotonic()
        raw.send(call("inbox", {"wait": 3}, 1))  # waits 3 s for a message that does not come
        raw.send(call("app.contacts", {}, 2))
        first = raw.answer()
        assert first == {"jsonrpc": "2.0", "id": 2, "result": {}}
        assert time.monotonic() - started < 2
        assert raw.answer()["id"] == 1 and time.monotonic() - started >= 2.9

        async def through_the_backend() -> float:
            backend = await DaemonBackend.attach(a)
            assert backend.account_id == alice
            try:
                slow = asyncio.create_task(backend._call("inbox", {"wait": 2}))
                await asyncio.sleep(0.1)
                t0 = time.monotonic()
                assert await backend.contacts() == {}
                fast = time.monotonic() - t0
                assert not slow.done()
                assert (await slow)["messages"] == []
                return fast
            finally:
                await backend.close()

        assert asyncio.run(through_the_backend()) < 1
        # a connection that did not subscribe (a command) does not keep the notification off
        kluis("send", "--profile", str(b), alice, "ping")
        deadline = time.monotonic() + 10
        while not notified.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert notified.read_text().strip() == "Kluis new message"
        raw.close()
        assert daemon.proc.poll() is None  # the app left; the daemon goes on
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.log.read_text()
