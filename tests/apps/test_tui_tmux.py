"""Smoke test: the real ``kluis chat`` in tmux against a real server: unlock, write to a peer,
and the peer receives it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kluis_testing import PASSPHRASE, ServerProcess

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def cli(*args: str, env: dict[str, str]) -> str:
    return subprocess.run(
        [sys.executable, "-m", "kluis.apps.cli", *args],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


def test_kluis_chat_in_tmux(server: ServerProcess, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "KLUIS_PASSPHRASE": PASSPHRASE,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    }
    me_code, peer_code = server.licences(2)
    me, peer = tmp_path / "me", tmp_path / "peer"
    cli("register", "--server", server.url, "--licence", me_code, "--profile", str(me), env=env)
    peer_id = cli(
        "register", "--server", server.url, "--licence", peer_code, "--profile", str(peer), env=env
    ).strip()

    socket = f"kluis-test-{os.getpid()}"
    tmux = ["tmux", "-L", socket]
    command = (
        f"env PYTHONPATH={env['PYTHONPATH']} TERM=xterm-256color "
        f"{sys.executable} -m kluis.apps.cli chat --profile {me}"
    )

    def capture() -> str:
        return subprocess.run(
            [*tmux, "capture-pane", "-p", "-t", "chat"], capture_output=True, text=True
        ).stdout

    def wait_for(text: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = capture()
            if text in screen:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not on screen:\n{capture()}")

    def keys(*k: str) -> None:
        subprocess.run([*tmux, "send-keys", "-t", "chat", *k], check=True)

    subprocess.run(
        [*tmux, "new-session", "-d", "-s", "chat", "-x", "100", "-y", "30", command], check=True
    )
    try:
        wait_for("Kluis is locked")
        keys("-l", PASSPHRASE)
        keys("Enter")
        wait_for("online")
        keys("C-n")
        wait_for("New conversation")
        keys("-l", peer_id)
        keys("Enter")
        wait_for(f"{peer_id}", 5)
        time.sleep(0.3)
        keys("-l", "hello from tmux")
        keys("Enter")
        screen = wait_for("you       hello from tmux")  # in the chat log, as sent
        assert "Traceback" not in screen
        inbox = cli("inbox", "--profile", str(peer), "--wait", "2", env=env)
        assert "hello from tmux" in inbox
        keys("C-q")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done = subprocess.run([*tmux, "has-session", "-t", "chat"], capture_output=True)
            if done.returncode != 0:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the app did not quit:\n{capture()}")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
