"""Every profile command while `kluis daemon` holds the profile: run by the daemon (the CLI's own
code on its client, no passphrase asked, output as when alone) through both entry points, or
refused in one clear line; never a second process writing the profile. Alone, a command holds
the profile's lock, so a daemon cannot start under it. `kluis wipe` through the daemon erases
the profile and stops the daemon."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kluis.apps import daemon as daemon_module
from kluis.apps import peer, quick, through_daemon
from kluis.apps.tui.remote import DaemonBackend
from kluis.errors import LocalProtocolError
from tests.integration.test_cli import kluis
from tests.integration.test_cli_quick import quick_kluis
from tests.integration.test_daemon import DaemonProcess, pair, rpc

__all__ = ["pair"]  # the fixture, imported for its name


def in_folder(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The full CLI run from ``folder`` (relative paths), with no passphrase anywhere."""
    env = {k: v for k, v in os.environ.items() if k != "KLUIS_PASSPHRASE"}
    return subprocess.run(
        [sys.executable, "-m", "kluis.apps.cli", *args],
        env=env,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_fast_path_hands_the_daemon_the_commands_it_runs() -> None:
    assert set(through_daemon.COMMANDS) == quick._THROUGH
    assert quick.whole(["contact", "list", "--profile", "P"]) == ("P", quick.DEFAULT_TIMEOUT_S)
    assert quick.whole(["--timeout", "3", "notes", "list", "--profile=P"]) == ("P", 3.0)
    assert quick.whole(["contact", "list", "--profile", "P", "--help"]) is None
    assert quick.whole(["chat", "--profile", "P"]) is None
    assert quick.whole(["serve", "--profile", "P"]) is None
    assert quick.whole(["notes", "list", "--profile", "P", "--profile", "Q"]) is None


def test_profile_commands_run_in_the_daemon(
    pair: tuple[str, str, str, str], tmp_path: Path
) -> None:
    a, alice, b, bob = pair
    picture = tmp_path / "note.txt"
    picture.write_bytes(b"file through the daemon\n" * 100)
    kluis("send", "--profile", b, alice, "hello alice")
    kluis("send", "--profile", b, alice, "a file", "--file", str(picture))
    kluis("contact", "add", "--profile", a, bob, "Bob")
    alone = {
        "contacts": kluis("contact", "list", "--profile", a).stdout,
        "safety": kluis("safety-number", "--profile", a, bob).stdout,
    }
    daemon = DaemonProcess(Path(a), "--lock-after", "60")
    try:
        daemon.wait_ready()
        got = kluis("inbox", "--profile", a, passphrase=None).stdout.splitlines()
        assert got[0].endswith("\thello alice") and got[0].startswith(f"{bob} (Bob)\t")

        # The same words as alone, with no passphrase: through the full CLI and the fast path.
        for run in (lambda *a_: kluis(*a_, passphrase=None), quick_kluis):
            assert run("contact", "list", "--profile", a).stdout == alone["contacts"]
            assert run("safety-number", "--profile", a, bob).stdout == alone["safety"]
            assert run("verify", "--profile", a, bob, "--status").stdout.strip() == "unverified"
            assert run("whoami", "--profile", a).stdout.strip() == alice
        rows = [
            json.loads(line)
            for line in quick_kluis("conversations", "--profile", a, "--json").stdout.splitlines()
        ]
        assert [(r["conversation"], r["name"]) for r in rows] == [(bob, "Bob")]

        # Commands that reach the server go over the daemon's connection.
        group = quick_kluis("group", "create", "--profile", a, "Team", bob).stdout.strip()
        members = kluis("group", "members", "--profile", a, group, passphrase=None).stdout
        assert members.splitlines() == [f"{group}\tTeam", *sorted([f"{alice}\t(you)", bob])]
        note = kluis("notes", "add", "--profile", a, "remember", passphrase=None).stdout.strip()
        assert note in kluis("notes", "list", "--profile", a, passphrase=None).stdout
        devices = quick_kluis("device", "list", "--profile", a).stdout
        assert "(this device)" in devices

        # A relative path is the caller's: fetch --out got, typed in tmp_path, saves there.
        fetched = in_folder(tmp_path, "fetch", "--profile", a, "--out", "got")
        assert fetched.returncode == 0, fetched.stderr
        (saved,) = (tmp_path / "got").iterdir()
        assert saved.read_bytes() == picture.read_bytes()
        assert fetched.stdout.strip() == str(saved)

        # What must not run in the daemon is refused in one line; the profile is untouched.
        for refused in (
            kluis("verify", "--profile", a, bob, passphrase=None, check=False),
            quick_kluis("verify", "--profile", a, bob),
            kluis("panic-passphrase", "--profile", a, passphrase=None, check=False),
        ):
            assert refused.returncode == 1, refused
            assert "does not run through the daemon" in refused.stderr
            assert f"kill {daemon.proc.pid}" in refused.stderr
            assert "Traceback" not in refused.stderr and len(refused.stderr.splitlines()) == 1

        # A hand-made `run`: another profile, a server command and a bad line are refused.
        sock = Path(a)
        for argv, code, words in (
            (["notes", "list", "--profile", str(tmp_path)], 1, "this daemon holds"),
            (["serve", "--data", str(tmp_path / "d")], 1, "does not run through the daemon"),
            (["register", "--server", "x", "--licence", "y", "--profile", a], 1, "does not run"),
            (["notes", "frob", "--profile", a], 2, "invalid choice"),
        ):
            line = {"jsonrpc": "2.0", "id": 1, "method": "run", "params": {"argv": argv}}
            line["params"]["cwd"] = str(tmp_path)  # type: ignore[index]
            answer = rpc(sock, json.dumps(line).encode())["result"]
            assert answer["code"] == code and words in answer["stderr"], answer  # type: ignore[index]
        not_absolute = {"argv": ["outbox", "--profile", a], "cwd": "."}
        line = {"jsonrpc": "2.0", "id": 2, "method": "run", "params": not_absolute}
        assert rpc(sock, json.dumps(line).encode())["error"]["code"] == -32602  # type: ignore[index]
        assert not (tmp_path / "d").exists()
        assert kluis("whoami", "--profile", a, passphrase=None).stdout.strip() == alice
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.log.read_text()
    log = daemon.log.read_text()
    assert "remember" not in log and "hello alice" not in log  # the daemon's log stays its own
    assert kluis("contact", "list", "--profile", a).stdout == alone["contacts"]  # alone again


def test_a_command_alone_holds_the_profile_and_wipe_goes_through_the_daemon(
    pair: tuple[str, str, str, str],
) -> None:
    a, _, _, bob = pair
    # An interactive verify waits for the peer, alone, holding the profile's lock shared.
    env = {**os.environ, "KLUIS_PASSPHRASE": "pw-cli"}
    with subprocess.Popen(
        [sys.executable, "-m", "kluis.apps.cli", "verify", "--profile", a, bob, "--timeout", "20"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as waiting:
        try:
            deadline = time.monotonic() + 20
            assert waiting.stderr is not None
            while "waiting" not in waiting.stderr.readline():  # it has the profile open
                assert time.monotonic() < deadline and waiting.poll() is None
            refused = kluis("daemon", "--profile", a, check=False)
            assert refused.returncode == 1 and "in use" in refused.stderr, refused.stderr
        finally:
            waiting.kill()

    daemon = DaemonProcess(Path(a), "--lock-after", "60")
    try:
        daemon.wait_ready()
        wiped = quick_kluis("wipe", "--profile", a)
        assert wiped.returncode == 0, wiped.stderr
        assert "erased" in wiped.stderr
        daemon.proc.wait(20)
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0
    assert "the profile was wiped" in daemon.log.read_text()
    assert list(Path(a).iterdir()) == []


async def test_a_socket_of_another_user_gets_nothing(
    pair: tuple[str, str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's socket is trusted only when its file and the process behind it are this
    user's: seen as another user (os.getuid patched), the CLI and the app send nothing to it."""
    a = Path(pair[0])
    daemon = DaemonProcess(a, "--lock-after", "60")
    try:
        await asyncio.to_thread(daemon.wait_ready)
        me = os.getuid()
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(a / "daemon.sock"))
            assert peer.peer_uid(sock) == me  # Linux says who serves it
            assert peer.foreign(sock, str(a / "daemon.sock")) is None
        monkeypatch.setattr(os, "getuid", lambda: me + 4242)
        assert quick.connect(str(a), 5) is None  # the fast path leaves it to the full CLI
        refused = pytest.raises(LocalProtocolError, match="belongs to another user")
        with refused, daemon_module.daemon_or_alone(a, 5):
            pass
        with pytest.raises(LocalProtocolError, match="nothing is sent to it"):
            await DaemonBackend.attach(a, timeout=5)
        monkeypatch.undo()
        backend = await DaemonBackend.attach(a, timeout=5)  # as its own user: attached
        assert backend.account_id == pair[1]
        await backend.close()
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.log.read_text()
