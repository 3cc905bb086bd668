"""`inbox --wait` prints each message as it arrives, and an interrupted inbox loses nothing:
every message is either printed or shown by the next inbox (a real process, a real signal)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.integration.test_cli import kluis, lines
from tests.kluis_testing import PASSPHRASE, ServerProcess, register


async def test_ctrl_c_during_inbox_wait_loses_no_message(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    bob_id = bob.account_id
    await alice.send(bob_id, "warm-up")  # sessions open before the timed part
    await bob.receive(wait=5, until=1)
    await bob.close()

    env = {**os.environ, "KLUIS_PASSPHRASE": PASSPHRASE}
    inbox = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kluis.apps.cli",
            "inbox",
            "--profile",
            str(tmp_path / "bob"),
            "--wait",
            "60",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sent = [f"message {i}" for i in range(40)]
    printed: list[str] = []
    loop = asyncio.get_running_loop()
    assert inbox.stdout is not None
    try:
        for i, text in enumerate(sent):
            await alice.send(bob_id, text)
            if i == 9:
                # Each message is printed as it arrives, not when the wait ends.
                first = await asyncio.wait_for(
                    loop.run_in_executor(None, inbox.stdout.readline), 30
                )
                printed.append(first)
            if i == 24:
                inbox.send_signal(signal.SIGINT)  # while messages keep arriving
        out, err = await loop.run_in_executor(None, inbox.communicate, None, 30)
    finally:
        if inbox.poll() is None:
            inbox.kill()
    assert inbox.returncode == 130, err
    assert "Traceback" not in err, err
    printed.extend(out.splitlines())
    later = kluis("inbox", "--profile", str(tmp_path / "bob"), passphrase=PASSPHRASE).stdout
    texts = [t for _, _, t in lines("\n".join(x.rstrip("\n") for x in printed if x.strip()))]
    texts += [t for _, _, t in lines(later)]
    # None lost, whatever the moment of the signal (the warm-up was never printed by inbox).
    assert set(texts) - {"warm-up"} == set(sent)
    await alice.close()


HOSTILE = "fake\r" + "a" * 16 + "\t00:00\tspoofed\x1b[2J\x07 \u202eevil\nsecond line"


async def test_hostile_text_is_shown_escaped_and_round_trips_in_json(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    await alice.send(bob.account_id, HOSTILE)
    await alice.close()
    await bob.close()
    profile = str(tmp_path / "bob")
    (line,) = kluis(
        "inbox", "--profile", profile, "--json", passphrase=PASSPHRASE
    ).stdout.splitlines()
    assert json.loads(line)["text"] == HOSTILE and json.loads(line)["sender"] == alice.account_id
    (history,) = kluis(
        "history", "--profile", profile, "--json", passphrase=PASSPHRASE
    ).stdout.splitlines()
    assert json.loads(history)["text"] == HOSTILE
    plain = kluis("history", "--profile", profile, passphrase=PASSPHRASE).stdout
    assert plain.count("\n") == 1  # one message, one line
    for raw in ("\r", "\x1b", "\x07", "\u202e"):
        assert raw not in plain
    fields = plain.rstrip("\n").split("\t")
    assert (
        len(fields) == 3 and fields[0] == alice.account_id
    )  # the peer's tabs and \r cannot fake another sender field
    assert "\\u202e" in plain and "\\n" in plain
