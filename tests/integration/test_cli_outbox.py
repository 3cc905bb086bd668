"""`kluis send` with the server stopped: kept in the outbox, listed by `kluis outbox`, and
delivered exactly once by the next command that reaches the server (real processes)."""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_cli import kluis, lines
from tests.integration.test_cli_inbox import HOSTILE
from tests.kluis_testing import ServerProcess

NOT_SENT = "not sent yet: kept in the outbox; it goes with the next command that reaches the server"


def test_send_while_the_server_is_down_goes_with_the_next_command(
    server: ServerProcess, tmp_path: Path
) -> None:
    codes = server.licences(2)
    a, b = str(tmp_path / "alice"), str(tmp_path / "bob")
    kluis("register", "--server", server.url, "--licence", codes[0], "--profile", a)
    bob = kluis(
        "register", "--server", server.url, "--licence", codes[1], "--profile", b
    ).stdout.strip()

    server.stop()
    down = kluis("--timeout", "5", "send", "--profile", a, bob, "while down", check=False)
    assert down.returncode == 1 and NOT_SENT in down.stderr and "Traceback" not in down.stderr
    long = "x" * 50 + HOSTILE
    assert kluis("send", "--profile", a, bob, long, check=False).returncode == 1
    listed = lines(kluis("outbox", "--profile", a).stdout)
    assert [(to, text) for to, _, text in listed] == [(bob, "while down"), (bob, "x" * 40 + "…")]
    assert kluis("history", "--profile", a, bob).stdout == ""  # not sent: not in history

    server.start()  # same port, same data
    assert kluis("inbox", "--profile", a).returncode == 0  # connects: the outbox goes
    assert kluis("outbox", "--profile", a).stdout == ""
    got = lines(kluis("inbox", "--profile", b).stdout)
    assert [text for _, _, text in got] == ["while down", "x" * 50 + _escaped()]
    assert kluis("send", "--profile", a, bob, "after").returncode == 0
    assert [t for _, _, t in lines(kluis("inbox", "--profile", b).stdout)] == ["after"]
    sent = [t for _, _, t in lines(kluis("history", "--profile", a, bob).stdout)]
    assert sent == ["while down", "x" * 50 + _escaped(), "after"]


def _escaped() -> str:
    from kluis.apps.cli import safe_text

    return safe_text(HOSTILE)


def test_outbox_shows_sanitised_text(server: ServerProcess, tmp_path: Path) -> None:
    (code,) = server.licences(1)
    a = str(tmp_path / "alice")
    kluis("register", "--server", server.url, "--licence", code, "--profile", a)
    server.stop()
    peer = "b" * 16
    assert kluis("send", "--profile", a, peer, "\x1b[2Jhi\r\nthere", check=False).returncode == 1
    out = kluis("outbox", "--profile", a).stdout
    assert "\x1b" not in out and "\r" not in out
    assert out.split("\t")[0] == peer and out.rstrip("\n").endswith("\\u001b[2Jhi\\u000d\\nthere")
