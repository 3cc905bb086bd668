"""The newcomer's run: a fresh clone, README's serve command until it answers, then README's
CLI flow with the licence it printed, and no traceback anywhere in the output."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.kluis_testing import free_port

ROOT = Path(__file__).resolve().parents[2]


def _readme_serve_command() -> str:
    text = (ROOT / "README.md").read_text()
    set_up = text.split("## Set-up", 1)[1].split("##", 1)[0]
    commands = [line.strip() for line in set_up.splitlines() if line.startswith("    ")]
    assert commands == ["make serve", "make test"], commands  # exactly the two set-up commands
    return commands[0]


@pytest.mark.timeout(600)
def test_fresh_clone_serves_and_the_readme_flow_works(tmp_path: Path) -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "kluis"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    command = [*_readme_serve_command().split(), f"PORT={port}", f"PYTHON={sys.executable}"]
    server = subprocess.Popen(
        command,
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # stop make and the server together
    )
    output: list[str] = []
    try:
        assert server.stdout is not None
        deadline = time.monotonic() + 420  # a first install from the package registry
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line:
                break
            output.append(line)
            if "listening on" in line:
                break
        log = "".join(output)
        assert "listening on" in log, log
        codes = re.findall(r"^[A-Z2-7]{4}(?:-[A-Z2-7]{4})+$", log, re.M)
        assert codes, log  # the first licence code, printed once
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
            assert answer.status == 200

        kluis = str(clone / ".venv" / "bin" / "kluis")
        cli_env = {**env, "KLUIS_PASSPHRASE": "a newcomer's passphrase"}
        more = subprocess.run(
            [kluis, "licence", "create", "--data", str(clone / "data")],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.split()
        url = f"http://127.0.0.1:{port}"
        seen: list[str] = []

        def run(*args: str) -> str:
            done = subprocess.run(
                [kluis, *args], env=cli_env, capture_output=True, text=True, timeout=120
            )
            seen.append(done.stdout + done.stderr)
            assert done.returncode == 0, done.stderr
            return done.stdout

        me = run(
            "register", "--server", url, "--licence", codes[-1], "--profile", str(tmp_path / "me")
        ).strip()
        peer = run(
            "register", "--server", url, "--licence", more[0], "--profile", str(tmp_path / "peer")
        ).strip()
        run("send", "--profile", str(tmp_path / "me"), peer, "hello")
        assert "hello" in run("inbox", "--profile", str(tmp_path / "peer"), "--wait", "2")
        assert "hello" in run("history", "--profile", str(tmp_path / "me"), peer)
        group = run("group", "create", "--profile", str(tmp_path / "me"), "friends", peer).strip()
        run("send", "--profile", str(tmp_path / "me"), group, "hello all")
        assert f"{group}/{me}" in run("inbox", "--profile", str(tmp_path / "peer"))
        for text in [*seen, log]:
            assert "Traceback" not in text, text
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
        if server.stdout is not None:
            server.stdout.close()
