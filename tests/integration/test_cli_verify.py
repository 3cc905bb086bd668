"""`kluis verify`: two processes against a real server, answered on standard input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.integration.test_cli import kluis
from tests.kluis_testing import ServerProcess


def start_verify(profile: str, peer: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kluis.apps.cli", "verify", "--profile", profile, peer],
        env={**os.environ, "KLUIS_PASSPHRASE": "pw-cli", "PYTHONIOENCODING": "utf-8"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def answer_both(procs: list[subprocess.Popen[str]], answers: list[str]) -> list[tuple[str, str]]:
    """Type each answer ahead (both wait for the other before asking), then collect output."""
    try:
        for proc, answer in zip(procs, answers, strict=True):
            assert proc.stdin is not None
            proc.stdin.write(answer)
            proc.stdin.close()
        outs = []
        for proc in procs:  # a few lines each: the pipes never fill
            proc.wait(90)
            assert proc.stdout is not None and proc.stderr is not None
            outs.append((proc.stdout.read(), proc.stderr.read()))
        return outs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def code_lines(out: str) -> list[str]:
    """The emoji line and the numbers line the user compares."""
    lines = out.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith("Compare with"))
    return [lines[i + 1].strip(), lines[i + 2].strip()]


def test_two_users_verify_each_other(server: ServerProcess, tmp_path: Path) -> None:
    a, b = str(tmp_path / "alice"), str(tmp_path / "bob")
    codes = server.licences(2)
    alice = kluis("register", "--server", server.url, "--licence", codes[0], "--profile", a)
    bob = kluis("register", "--server", server.url, "--licence", codes[1], "--profile", b)
    alice_id, bob_id = alice.stdout.strip(), bob.stdout.strip()
    assert kluis("verify", "--profile", a, bob_id, "--status").stdout == "unverified\n"

    # Both at about the same time; each says yes to what it is shown.
    procs = [start_verify(a, bob_id), start_verify(b, alice_id)]
    outs = answer_both(procs, ["y\n", "y\n"])
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
        assert "Do they match? [y/N]" in out
    (out_a, _), (out_b, _) = outs
    assert code_lines(out_a) == code_lines(out_b)
    emoji, numbers = code_lines(out_a)
    assert len(emoji.split("  ")) == 7 and re.fullmatch(r"\d{4} \d{4} \d{4}", numbers)
    assert f"verified: {bob_id}" in out_a and f"verified: {alice_id}" in out_b
    assert kluis("verify", "--profile", a, bob_id, "--status").stdout == "verified\n"
    assert kluis("send", "--profile", a, bob_id, "checked").returncode == 0


def test_a_no_on_either_side_fails_both(server: ServerProcess, tmp_path: Path) -> None:
    a, b = str(tmp_path / "alice"), str(tmp_path / "bob")
    codes = server.licences(2)
    alice_id = kluis("register", "--server", server.url, "--licence", codes[0], "--profile", a)
    bob_id = kluis("register", "--server", server.url, "--licence", codes[1], "--profile", b)
    procs = [start_verify(a, bob_id.stdout.strip()), start_verify(b, alice_id.stdout.strip())]
    outs = answer_both(procs, ["y\n", "n\n"])
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 1 and "error: verification_failed" in err, err
    assert kluis("verify", "--profile", a, bob_id.stdout.strip(), "--status").stdout == (
        "unverified\n"
    )
