"""The `kluis` entry point's fast path: with a daemon holding the profile, send, inbox, history
and whoami are answered over its socket by a module that loads no client code, and print what
the full CLI prints; everything else, and no daemon, goes to the full CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kluis.apps import cli, daemon, quick
from tests.integration.test_cli import kluis, lines
from tests.integration.test_daemon import DaemonProcess, pair
from tests.kluis_testing import ServerProcess

__all__ = ["pair"]  # the fixture, imported for its name


def quick_kluis(
    *args: str, stdin: str = "", importtime: bool = False
) -> subprocess.CompletedProcess[str]:
    """``kluis`` as the console script runs it, with no passphrase anywhere."""
    env = {k: v for k, v in os.environ.items() if k != "KLUIS_PASSPHRASE"}
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run(
        [sys.executable, *flags, "-m", "kluis.apps.quick", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
    )


def test_the_fast_path_reads_plain_commands_and_leaves_the_rest() -> None:
    p = quick.parse(["send", "--profile", "P", "ID", "hello"])
    assert p is not None and (p.command, p.profile, p.positionals) == ("send", "P", ["ID", "hello"])
    p = quick.parse(["--timeout=5", "inbox", "--wait", "2.5", "--json", "--profile=P"])
    assert p is not None and (p.timeout, p.wait, p.json) == (5.0, 2.5, True)
    p = quick.parse(["history", "--profile", "P", "ID"])
    assert p is not None and p.positionals == ["ID"]
    for argv in (
        [],
        ["send", "--profile", "P", "ID"],  # no TEXT: the full CLI explains
        ["send", "--profile", "P", "ID", "x", "--file", "f"],
        ["send", "--prof", "P", "ID", "x"],  # an abbreviation: argparse's business
        ["send", "--profile", "P", "ID", "-x"],
        ["inbox", "--profile", "P", "--help"],
        ["inbox", "--profile", "P", "--wait", "soon"],
        ["inbox", "--profile"],
        ["inbox"],
        ["whoami", "--profile", "P", "extra"],
        ["history", "--profile", "P", "--wait", "1"],
        ["--timeout", "0", "whoami", "--profile", "P"],
        ["conversations", "--profile", "P"],
        ["send", "--profile", "P", "--", "ID", "x"],
    ):
        assert quick.parse(argv) is None, argv
    # The names it shares with modules it must not import.
    assert quick.DEFAULT_TIMEOUT_S == cli.DEFAULT_TIMEOUT_S
    assert (quick.SOCKET, quick.LOCK) == (daemon.SOCKET, daemon.LOCK)


@pytest.fixture
def running(pair: tuple[str, str, str, str]) -> Iterator[tuple[str, str, str, str]]:
    a = pair[0]
    proc = DaemonProcess(Path(a), "--lock-after", "60")
    try:
        proc.wait_ready()
        yield pair
    finally:
        proc.stop()


def test_send_inbox_history_whoami_through_the_daemon_without_the_client(
    running: tuple[str, str, str, str], server: ServerProcess
) -> None:
    a, alice, b, bob = running
    who = quick_kluis("whoami", "--profile", a, importtime=True)
    assert who.returncode == 0 and who.stdout.strip() == alice
    loaded = who.stderr
    # The point of it: no client, crypto or network stack was imported.
    for heavy in ("kluis.client", "aiohttp", "vodozemac", "kluis.apps.cli", "rich"):
        assert f" {heavy}\n" not in loaded and f" {heavy}." not in loaded, heavy

    sent = quick_kluis("send", "--profile", a, bob, "-", stdin="two\nlines\x1b[2J")
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout == f"sent to {bob}\n"
    kluis("send", "--profile", b, alice, "back")
    got = quick_kluis("inbox", "--profile", a, "--wait", "5")
    assert got.returncode == 0, got.stderr
    assert [(s, t) for s, _, t in lines(got.stdout)] == [(bob, "back")]
    assert quick_kluis("inbox", "--profile", a).stdout == ""  # shown once

    # history prints as the full CLI's history does (escaped, continuation lines indented).
    mine = quick_kluis("history", "--profile", a, bob)
    assert mine.returncode == 0, mine.stderr
    full = kluis("history", "--profile", a, bob)
    assert mine.stdout == full.stdout and "\\u001b[2J" in mine.stdout
    as_json = quick_kluis("history", "--profile", a, "--json")
    assert as_json.stdout == kluis("history", "--profile", a, "--json").stdout


def test_an_error_on_the_fast_path_reads_as_the_full_clis(
    running: tuple[str, str, str, str],
) -> None:
    a = running[0]
    unknown = "k" + "A" * 43
    mine = quick_kluis("send", "--profile", a, unknown, "hello")
    full = kluis("send", "--profile", a, unknown, "hello", check=False)
    assert mine.returncode == full.returncode == 1
    assert mine.stderr == full.stderr and mine.stderr.startswith("error: ")
    assert "Traceback" not in mine.stderr


def test_without_a_daemon_the_full_cli_answers(pair: tuple[str, str, str, str]) -> None:
    a, alice = pair[0], pair[1]
    # No daemon and no passphrase: the full CLI asks for it, and says it cannot (no terminal).
    alone = quick_kluis("whoami", "--profile", a)
    assert alone.returncode == 1 and "passphrase" in alone.stderr
    assert "Traceback" not in alone.stderr
    env = {**os.environ, "KLUIS_PASSPHRASE": "pw-cli"}
    with_pw = subprocess.run(
        [sys.executable, "-m", "kluis.apps.quick", "whoami", "--profile", a],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert with_pw.stdout.strip() == alice
