"""The `kluis` command, exactly as documented, against a real server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from tests.kluis_testing import ServerProcess

# sender, time, text; history adds a receipt mark (✓ delivered, ✓✓ read) to our sent messages
LINE = re.compile(r"^([a-z2-7]{16})\t(\S+)\t([^\t]*)(?:\t\u2713{1,2})?$")


def kluis(
    *args: str, passphrase: str | None = "pw-cli", check: bool = True, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run the CLI; ``passphrase`` None leaves KLUIS_PASSPHRASE unset (stdin is not a tty)."""
    env = {k: v for k, v in os.environ.items() if k != "KLUIS_PASSPHRASE"}
    if passphrase is not None:
        env["KLUIS_PASSPHRASE"] = passphrase
    proc = subprocess.run(
        [sys.executable, "-m", "kluis.apps.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def lines(out: str) -> list[tuple[str, str, str]]:
    parsed = []
    for line in out.splitlines():
        m = LINE.match(line)
        assert m, f"not 'ID<TAB>time<TAB>text': {line!r}"
        datetime.fromisoformat(m.group(2))  # ISO-8601
        parsed.append((m.group(1), m.group(2), m.group(3)))
    return parsed


def test_cli_end_to_end(server: ServerProcess, tmp_path: Path) -> None:
    data = str(server.data)
    codes = kluis(
        "licence", "create", "--data", data, "--count", "2", "--days", "30"
    ).stdout.split()
    assert len(codes) == 2
    a, b, a2 = (str(tmp_path / n) for n in ("alice", "bob", "alice2"))

    alice = kluis(
        "register", "--server", server.url, "--licence", codes[0], "--profile", a
    ).stdout.strip()
    bob = kluis(
        "register", "--server", server.url, "--licence", codes[1], "--profile", b
    ).stdout.strip()
    assert re.fullmatch(r"[a-z2-7]{16}", alice) and alice != bob
    assert kluis("whoami", "--profile", a).stdout.strip() == alice

    again = kluis(
        "register",
        "--server",
        server.url,
        "--licence",
        codes[0],
        "--profile",
        str(tmp_path / "x"),
        check=False,
    )
    assert again.returncode == 1 and "licence_invalid" in again.stderr

    assert kluis("send", "--profile", a, bob, "hello bob").returncode == 0
    assert [(s, t) for s, _, t in lines(kluis("inbox", "--profile", b).stdout)] == [
        (alice, "hello bob")
    ]
    assert kluis("inbox", "--profile", b).stdout == ""  # acknowledged and gone
    seen_by_alice = kluis("safety-number", "--profile", a, bob).stdout.strip()
    assert seen_by_alice == kluis("safety-number", "--profile", b).stdout.strip()
    assert re.fullmatch(r"(\d{5} ){5}\d{5}", seen_by_alice)

    # inbox --wait picks up a message sent while it waits.
    env = {**os.environ, "KLUIS_PASSPHRASE": "pw-cli"}
    waiting = subprocess.Popen(
        [sys.executable, "-m", "kluis.apps.cli", "inbox", "--profile", a, "--wait", "8"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.5)
    kluis("send", "--profile", b, alice, "reply while you wait")
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 0, err
    assert [(s, t) for s, _, t in lines(out)] == [(bob, "reply while you wait")]

    # A second device for Alice.
    code = kluis("device", "request", "--server", server.url, "--profile", a2).stdout.strip()
    assert re.fullmatch(r"[a-z2-7]{12}-[a-z2-7]{26}", code)
    device2 = kluis("device", "approve", "--profile", a, code).stdout.strip()
    assert kluis("whoami", "--profile", a2).stdout.strip() == alice
    listed = kluis("device", "list", "--profile", a).stdout.split("\n")
    assert any(device2 in line for line in listed) and len([x for x in listed if x]) == 2

    kluis("send", "--profile", b, alice, "to all your devices")
    assert [t for _, _, t in lines(kluis("inbox", "--profile", a2).stdout)] == [
        "to all your devices"
    ]
    assert [t for _, _, t in lines(kluis("inbox", "--profile", a).stdout)] == [
        "to all your devices"
    ]

    history = lines(kluis("history", "--profile", a, bob).stdout)
    assert [(s, t) for s, _, t in history] == [
        (alice, "hello bob"),
        (bob, "reply while you wait"),
        (bob, "to all your devices"),
    ]
    times = [datetime.fromisoformat(t) for _, t, _ in history]
    assert times == sorted(times)
    assert lines(kluis("history", "--profile", a).stdout) == history  # only one conversation

    kluis("device", "revoke", "--profile", a, device2)
    assert len([x for x in kluis("device", "list", "--profile", a).stdout.split("\n") if x]) == 1
    refused = kluis("inbox", "--profile", a2, check=False)
    assert refused.returncode == 1 and "unknown_device" in refused.stderr


def test_cli_errors_are_typed(server: ServerProcess, tmp_path: Path) -> None:
    (code,) = server.licences(1)
    a = str(tmp_path / "alice")
    kluis("register", "--server", server.url, "--licence", code, "--profile", a)
    wrong = kluis("whoami", "--profile", a, passphrase="not the passphrase", check=False)
    assert wrong.returncode == 1 and "wrong_passphrase" in wrong.stderr
    unknown = kluis("send", "--profile", a, "aaaaaaaaaaaaaaaa", "hello?", check=False)
    assert unknown.returncode == 1 and "unknown_account" in unknown.stderr
    missing = kluis("inbox", "--profile", str(tmp_path / "nobody"), check=False)
    assert missing.returncode == 1 and "no profile" in missing.stderr
    down = kluis(
        "register",
        "--server",
        "http://127.0.0.1:1",
        "--licence",
        code,
        "--profile",
        str(tmp_path / "z"),
        check=False,
    )
    assert down.returncode == 1 and "transport" in down.stderr
    assert not (tmp_path / "z" / "profile.json").exists()
