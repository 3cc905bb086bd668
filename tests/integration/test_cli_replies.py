"""``kluis send --reply-to``, and replies in history and inbox (human and ``--json``), against a
real server: the quote comes from the reader's own history, sanitised; an unknown ID is one
line and exit 1."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.test_cli import kluis
from tests.kluis_testing import ServerProcess


def test_cli_reply_to_shows_the_quote_escaped_and_in_json(
    server: ServerProcess, tmp_path: Path
) -> None:
    codes = server.licences(2)
    a, b = str(tmp_path / "alice"), str(tmp_path / "bob")
    alice = kluis("register", "--server", server.url, "--licence", codes[0], "--profile", a)
    bob = kluis("register", "--server", server.url, "--licence", codes[1], "--profile", b)
    alice_id, bob_id = alice.stdout.strip(), bob.stdout.strip()

    kluis("send", "--profile", a, bob_id, "lunch\x1b[2J at noon?")
    (question,) = map(json.loads, kluis("inbox", "--profile", b, "--json").stdout.splitlines())
    assert "reply_to" not in question and len(question["id"]) == 32

    unknown = kluis("send", "--profile", b, alice_id, "x", "--reply-to", "00000000", check=False)
    assert unknown.returncode == 1 and "unknown_reply" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    kluis("send", "--profile", b, alice_id, "yes", "--reply-to", question["id"][:8])

    (line,) = kluis("inbox", "--profile", a).stdout.splitlines()
    text = line.split("\t")[2]
    assert text == f"[reply to {question['id'][:8]}: lunch\\u001b[2J at noon?] yes"
    (record,) = map(
        json.loads, kluis("history", "--profile", a, bob_id, "--json").stdout.splitlines()[1:]
    )
    assert record["reply_to"] == question["id"] and record["text"] == "yes"
    assert record["quote"] == {"sender": alice_id, "text": "lunch\x1b[2J at noon?"}
