"""A stopped server (SIGSTOP: it accepts TCP and then says nothing) never hangs the CLI: every
network command ends within its timeout with one clear line and exit status 1."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.integration.test_cli import kluis
from tests.kluis_testing import ServerProcess


def test_every_network_command_ends_within_its_timeout(
    server: ServerProcess, tmp_path: Path
) -> None:
    a, b = str(tmp_path / "alice"), str(tmp_path / "bob")
    codes = kluis("licence", "create", "--data", str(server.data), "--count", "3").stdout.split()
    kluis("register", "--server", server.url, "--licence", codes[0], "--profile", a)
    bob = kluis(
        "register", "--server", server.url, "--licence", codes[1], "--profile", b
    ).stdout.strip()
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        commands = [
            ["send", "--profile", a, bob, "hello?"],
            ["inbox", "--profile", a, "--wait", "30"],
            ["device", "list", "--profile", a],
            ["safety-number", "--profile", a, bob],
            ["group", "create", "--profile", a, "g", bob],
            [
                "register",
                "--server",
                server.url,
                "--licence",
                codes[2],
                "--profile",
                str(tmp_path / "c"),
            ],
            ["device", "request", "--server", server.url, "--profile", str(tmp_path / "d")],
        ]
        for command in commands:
            started = time.monotonic()
            out = kluis("--timeout", "2", *command, check=False)
            took = time.monotonic() - started
            assert out.returncode == 1, (command, out.stdout, out.stderr)
            assert "Traceback" not in out.stderr, out.stderr
            # A text that could not go waits in the outbox and says so (test_cli_outbox.py).
            lead = "not sent yet:" if command[0] == "send" else "error:"
            (line,) = [x for x in out.stderr.splitlines() if x.startswith(lead)]
            assert "within 2 s" in line, line
            assert took < 15, (command, took)  # 2 s, plus unlocking and a bounded close
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def test_failures_are_one_line_and_change_nothing(server: ServerProcess, tmp_path: Path) -> None:
    typo = tmp_path / "dta"
    out = kluis("licence", "create", "--data", str(typo), check=False)
    assert out.returncode == 1 and "holds no Kluis database" in out.stderr
    assert not typo.exists()  # no second, empty database
    out = kluis("serve", "--data", str(tmp_path / "x"), "--port", "99999", check=False)
    assert out.returncode == 2 and "not a TCP port" in out.stderr
    # The port is taken (by the running server): one line, and never "listening".
    out = kluis("serve", "--data", str(tmp_path / "y"), "--port", str(server.port), check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "cannot listen on" in out.stderr and "listening on" not in out.stderr.replace(
        "cannot listen on", ""
    )
    # A passphrase: none without a terminal, and never an empty one for a new profile.
    env_free = kluis("whoami", "--profile", str(tmp_path / "p"), check=False, passphrase=None)
    assert env_free.returncode == 1 and "set KLUIS_PASSPHRASE" in env_free.stderr
    empty = kluis(
        "register",
        "--server",
        server.url,
        "--licence",
        "x",
        "--profile",
        str(tmp_path / "q"),
        passphrase="",
        check=False,
    )
    assert empty.returncode == 1 and "needs a passphrase" in empty.stderr
    assert not (tmp_path / "q").exists()
    for result in (out, env_free, empty):
        assert "Traceback" not in result.stderr
