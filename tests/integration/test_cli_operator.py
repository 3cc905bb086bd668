"""The operator's commands (issue 11), exactly as documented, against a real server."""

from __future__ import annotations

import csv
import re
import stat
from pathlib import Path

import pytest

from tests.integration.test_cli import kluis
from tests.kluis_testing import ServerProcess


def test_operator_commands_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "server"
    server = ServerProcess(data)
    kluis("licence", "create", "--init", "--data", str(data), "--count", "1")  # makes the db
    init = kluis("admin", "init", "--data", str(data), "--public-url", server.url)
    assert re.fullmatch(r"[A-Za-z0-9+/]{43}", init.stdout.strip())
    assert "operator.key" in init.stderr
    assert stat.S_IMODE((data / "operator.key").stat().st_mode) == 0o600
    server.start()
    try:
        codes_csv = tmp_path / "codes.csv"
        out = kluis(
            "licence", "create", "--data", str(data), "--plan", "year", "--count", "2",
            "--csv", str(codes_csv),
        )  # fmt: skip
        codes = out.stdout.split()
        rows = list(csv.DictReader(codes_csv.read_text().splitlines()))
        assert [(r["code"], r["plan"], r["days"]) for r in rows] == [
            (c, "year", "365") for c in codes
        ]
        assert stat.S_IMODE(codes_csv.stat().st_mode) == 0o600
        a, b = str(tmp_path / "alice"), str(tmp_path / "bob")
        alice = kluis("register", "--server", server.url, "--licence", codes[0], "--profile", a)
        kluis("register", "--server", server.url, "--licence", codes[1], "--profile", b)
        who = kluis("whoami", "--profile", a)
        assert who.stdout == alice.stdout  # the bare ID; the end goes to stderr
        assert re.fullmatch(r"subscription ends on \d{4}-\d\d-\d\d\n", who.stderr)

        (renewal,) = kluis("licence", "create", "--data", str(data), "--days", "10").stdout.split()
        renewed = kluis("licence", "renew", "--profile", a, renewal)
        assert renewed.stdout.startswith("subscription ends on ")

        kluis("admin", "announce", "--data", str(data), "service notice: upgrade on Sunday")
        line = kluis("inbox", "--profile", b, "--wait", "1").stdout.strip()
        assert re.fullmatch(r"operator\t\S+\tservice notice: upgrade on Sunday", line)

        kluis("admin", "account", "suspend", "--data", str(data), alice.stdout.strip())
        refused = kluis("inbox", "--profile", a, check=False)
        assert refused.returncode == 1 and "account_suspended" in refused.stderr
        kluis("admin", "account", "reinstate", "--data", str(data), alice.stdout.strip())
        kluis("inbox", "--profile", a)

        # The panic passphrase: the profile is erased and the unlock fails as for no profile.
        monkeypatch.setenv("KLUIS_PANIC_PASSPHRASE", "duress")
        kluis("panic-passphrase", "--profile", b)
        missing = kluis("whoami", "--profile", str(tmp_path / "nobody"), check=False)
        panic = kluis("whoami", "--profile", b, passphrase="duress", check=False)
        assert panic.returncode == missing.returncode == 1
        assert panic.stderr.replace("bob", "nobody") == missing.stderr
        assert not any(Path(b).iterdir())
        audit = kluis("audit-storage", "--data", str(data), "--profile", b, passphrase="duress")
        assert audit.returncode == 0

        kluis("admin", "wipe", "--data", str(data), alice.stdout.strip())
        wiped = kluis("inbox", "--profile", a, check=False)
        assert wiped.returncode == 1 and "device_wiped" in wiped.stderr
        assert not any(Path(a).iterdir())
        kluis("wipe", "--profile", str(tmp_path / "alice"), check=False)  # nothing left to erase
    finally:
        server.stop()
