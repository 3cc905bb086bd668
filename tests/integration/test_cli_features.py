"""Issue 9's commands, exactly as documented, against a real server: contact, conversations,
timer, receipts, notes; nicknames and sanitised text in every output."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from tests.integration.test_cli import kluis
from tests.kluis_testing import ServerProcess


def test_cli_contacts_conversations_receipts_timers_notes(
    server: ServerProcess, tmp_path: Path
) -> None:
    codes = server.licences(2)
    a, b = str(tmp_path / "alice"), str(tmp_path / "bob")
    alice = kluis(
        "register", "--server", server.url, "--licence", codes[0], "--profile", a
    ).stdout.strip()
    bob = kluis(
        "register", "--server", server.url, "--licence", codes[1], "--profile", b
    ).stdout.strip()

    assert kluis("contact", "add", "--profile", a, bob, "Bob").stdout == f"{bob} (Bob)\n"
    again = kluis("contact", "add", "--profile", a, bob, "Bob", check=False)
    assert again.returncode == 1 and "rename" in again.stderr
    evil = kluis("contact", "rename", "--profile", a, bob, "Bob\x1b[2J", check=False)
    assert evil.returncode == 1 and "control" in evil.stderr
    kluis("contact", "rename", "--profile", a, bob, "Bobby")
    assert kluis("contact", "list", "--profile", a).stdout == f"{bob}\tBobby\n"

    # A peer's text never reaches the terminal raw.
    sent = kluis("send", "--profile", a, bob, "hi\x1b]0;pwned\x07\nsecond line")
    assert sent.stdout == f"sent to {bob} (Bobby)\n"
    out = kluis("inbox", "--profile", b).stdout
    assert "\x1b" not in out and "\x07" not in out
    assert out.split("\t")[0] == alice
    assert out.rstrip("\n").split("\t")[2] == "hi\\u001b]0;pwned\\u0007\\nsecond line"

    kluis("send", "--profile", b, alice, "one")
    kluis("send", "--profile", b, alice, "two")
    (line,) = kluis("conversations", "--profile", a).stdout.splitlines()
    conversation, name, unread, last = line.split("\t")
    assert (conversation, name, unread) == (bob, "Bobby", "0")  # nothing received yet
    datetime.fromisoformat(last)
    inbox = kluis("inbox", "--profile", a).stdout.splitlines()
    assert [x.split("\t")[0] for x in inbox] == [f"{bob} (Bobby)"] * 2  # ID first, then name
    assert kluis("conversations", "--profile", a).stdout.split("\t")[2] == "0"  # printed: read
    (line,) = kluis("conversations", "--profile", b).stdout.splitlines()
    assert line.split("\t")[:3] == [alice, "-", "0"]

    # Bob's inbox read Alice's message: a read receipt reached Alice with her inbox.
    history = kluis("history", "--profile", a, bob).stdout.splitlines()
    assert history[0].endswith("\t\u2713\u2713") and history[0].startswith(alice + "\t")

    assert "read receipts off" in kluis("receipts", "--profile", b, "off").stdout
    kluis("send", "--profile", a, bob, "after off")
    kluis("inbox", "--profile", b)
    kluis("inbox", "--profile", a)
    last_line = kluis("history", "--profile", a, bob).stdout.splitlines()[-1]
    assert last_line.split("\t")[2:] == ["after off", "\u2713"]  # delivered, never read

    refused = kluis("timer", "--profile", a, bob, "5", check=False)
    assert refused.returncode == 1 and "timer" in refused.stderr
    assert kluis("timer", "--profile", a, bob, "30").stdout == f"{bob} (Bobby): 30 s\n"
    (timer_line,) = kluis("inbox", "--profile", b).stdout.splitlines()
    assert timer_line.split("\t")[2] == "[timer] disappearing messages: 30 s"

    note = kluis("notes", "add", "--profile", a, "locker 12\tcode 3456").stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{8}", note)
    (listed,) = kluis("notes", "list", "--profile", a).stdout.splitlines()
    assert listed.split("\t")[0] == note and listed.endswith("\tlocker 12\\tcode 3456")
    kluis("notes", "delete", "--profile", a, note)
    assert kluis("notes", "list", "--profile", a).stdout == ""
    missing = kluis("notes", "delete", "--profile", a, note, check=False)
    assert missing.returncode == 1 and "no note" in missing.stderr
