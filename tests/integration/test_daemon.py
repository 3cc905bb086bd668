"""`kluis daemon` as a real process with a real server: send and inbox go through its socket,
the socket is 0600, it refuses an open folder, notifies without content, and locks when idle."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_cli import kluis, lines
from tests.kluis_testing import ServerProcess


class DaemonProcess:
    def __init__(self, profile: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.profile = profile
        self.log = profile.parent / f"{profile.name}-daemon.log"
        environ = {**os.environ, "KLUIS_PASSPHRASE": "pw-cli", **(env or {})}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kluis.apps.cli",
                    "daemon",
                    "--profile",
                    str(profile),
                    *args,
                ],
                env=environ,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            if (self.profile / "daemon.sock").exists() and "listening" in self.log.read_text():
                time.sleep(0.3)  # and connected (the first events() round)
                return
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def pair(server: ServerProcess, tmp_path: Path) -> Iterator[tuple[str, str, str, str]]:
    """Profiles and IDs of alice and bob, registered with the CLI."""
    codes = server.licences(2)
    a, b = str(tmp_path / "alice"), str(tmp_path / "bob")
    alice = kluis(
        "register", "--server", server.url, "--licence", codes[0], "--profile", a
    ).stdout.strip()
    bob = kluis(
        "register", "--server", server.url, "--licence", codes[1], "--profile", b
    ).stdout.strip()
    yield a, alice, b, bob


def test_send_and_inbox_through_the_daemon(pair: tuple[str, str, str, str], tmp_path: Path) -> None:
    a, alice, b, bob = pair
    bin_dir = tmp_path / "bin"  # a notify-send that records what it was asked to show
    bin_dir.mkdir()
    shown = tmp_path / "notified"
    (bin_dir / "notify-send").write_text(f'#!/bin/sh\necho "$@" >> {shown}\n')
    (bin_dir / "notify-send").chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    daemon = DaemonProcess(Path(a), "--lock-after", "60", env={"PATH": path})
    try:
        daemon.wait_ready()
        sock = Path(a) / "daemon.sock"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600 and stat.S_ISSOCK(sock.stat().st_mode)

        # No passphrase: the command can only have gone through the daemon.
        sent = kluis("send", "--profile", a, bob, "via the daemon", passphrase=None)
        assert sent.stdout.strip() == f"sent to {bob}"
        assert [(s, t) for s, _, t in lines(kluis("inbox", "--profile", b).stdout)] == [
            (alice, "via the daemon")
        ]

        kluis("send", "--profile", b, alice, "secret words\x1b[2J")
        deadline = time.monotonic() + 10
        while not shown.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert shown.read_text().strip() == "Kluis new message"  # never the content

        got = lines(kluis("inbox", "--profile", a, passphrase=None).stdout)
        assert [(s, t) for s, _, t in got] == [(bob, "secret words\\u001b[2J")]
        assert kluis("inbox", "--profile", a, passphrase=None).stdout == ""  # shown once
        waited = kluis("inbox", "--profile", a, "--wait", "0.5", "--json", passphrase=None)
        assert waited.stdout == ""

        # A reply through the daemon: --reply-to takes the start of the id history --json gives
        history = kluis("history", "--profile", a, bob, "--json").stdout
        (quoted,) = [m for m in map(json.loads, history.splitlines()) if m["sender"] == bob]
        ref = quoted["id"][:8]
        kluis("send", "--profile", a, bob, "seen", "--reply-to", ref, passphrase=None)
        (reply,) = lines(kluis("inbox", "--profile", b).stdout)
        assert reply[2] == f"[reply to {ref}: secret words\\u001b[2J] seen"

        # The daemon holds the profile: with its socket gone, a command says so and stops.
        sock.unlink()
        refused = kluis("send", "--profile", a, bob, "x", check=False)
        assert refused.returncode == 1
        assert "daemon" in refused.stderr and "does not answer" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.log.read_text()
    # Gone: the commands work alone again (and nothing went twice).
    kluis("send", "--profile", a, bob, "alone again")
    assert [t for _, _, t in lines(kluis("inbox", "--profile", b).stdout)] == ["alone again"]


def rpc(profile: Path, line: bytes) -> dict[str, object]:
    """One raw JSON-RPC line to the daemon's socket, and its answer."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(profile / "daemon.sock"))
        sock.sendall(line + b"\n")
        answer: dict[str, object] = json.loads(sock.makefile("rb").readline())
        return answer


def test_daemon_answers_json_rpc_and_locks_after_idle_time(
    pair: tuple[str, str, str, str],
) -> None:
    a, alice, _, bob = pair
    daemon = DaemonProcess(Path(a), "--lock-after", "2")
    try:
        daemon.wait_ready()
        whoami = rpc(Path(a), b'{"jsonrpc": "2.0", "id": 7, "method": "whoami"}')
        assert whoami["id"] == 7 and isinstance(whoami["result"], dict)
        assert whoami["result"]["account"] == alice
        assert whoami["result"]["notice"] == ""  # 182 days left: no renewal notice yet
        assert str(whoami["result"]["ends"]) > time.strftime("%Y-%m-%d")
        nope = rpc(Path(a), b'{"jsonrpc": "2.0", "id": 8, "method": "nope", "params": {}}')
        assert nope["error"] == {"code": -32601, "message": "no method 'nope'"}
        assert rpc(Path(a), b"{not json")["error"] == {"code": -32700, "message": "parse error"}
        refused = rpc(
            Path(a),
            b'{"jsonrpc": "2.0", "id": 9, "method": "send", "params": {"to": "nobody", "text": "x"}}',
        )
        assert refused["error"]["data"]["code"] != "not_sent"  # type: ignore[index]
        daemon.proc.wait(30)  # exits by itself 2 s after the last request
    finally:
        daemon.stop()
    log = daemon.log.read_text()
    assert daemon.proc.returncode == 0 and "locked after 2 s idle" in log, log
    assert not (Path(a) / "daemon.sock").exists()
    needs_key = kluis("send", "--profile", a, bob, "x", passphrase=None, check=False)
    assert needs_key.returncode == 1 and "passphrase" in needs_key.stderr


def test_daemon_refuses_an_open_folder_and_a_second_daemon(
    pair: tuple[str, str, str, str],
) -> None:
    a = pair[0]
    os.chmod(a, 0o750)
    refused = kluis("daemon", "--profile", a, check=False)
    assert refused.returncode == 1 and "chmod 700" in refused.stderr
    os.chmod(a, 0o700)
    daemon = DaemonProcess(Path(a))
    try:
        daemon.wait_ready()
        second = kluis("daemon", "--profile", a, check=False)
        assert second.returncode == 1 and "in use" in second.stderr
    finally:
        daemon.proc.send_signal(signal.SIGINT)
        daemon.proc.wait(10)
    assert daemon.proc.returncode == 0
