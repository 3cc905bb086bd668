"""Device names and dates in `kluis device list`, kept in the profile only, over a real server."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from tests.integration.test_cli import kluis
from tests.kluis_testing import ServerProcess


def listing(profile: str) -> list[list[str]]:
    out = kluis("device", "list", "--profile", profile).stdout
    return [line.split("\t") for line in out.splitlines()]


def test_devices_get_names_and_the_day_they_were_added(
    server: ServerProcess, tmp_path: Path
) -> None:
    (code,) = server.licences(1)
    a, a2 = str(tmp_path / "a"), str(tmp_path / "a2")
    today = datetime.now(UTC).date().isoformat()  # the CLI prints days in UTC
    kluis(
        "register", "--server", server.url, "--licence", code, "--profile", a,
        "--device-name", "desk",
    )  # fmt: skip
    (first,) = listing(a)
    assert first[1:] == ["certified", today, "desk (this device)"]
    this_device = first[0]

    link = kluis(
        "device", "request", "--server", server.url, "--profile", a2,
        "--device-name", "phone",
    ).stdout.strip()  # fmt: skip
    second = kluis("device", "approve", "--profile", a, link, "--name", "laptop").stdout.strip()
    rows = {row[0]: row[1:] for row in listing(a)}
    assert rows[second] == ["certified", today, "laptop"]
    # the new device names itself in its own profile: names never travel
    rows2 = {row[0]: row[1:] for row in listing(a2)}
    assert rows2[second] == ["certified", today, "phone (this device)"]
    assert rows2[this_device] == ["certified", today, "-"]

    # renamed; a name with a control character is refused, in one line with its code
    assert "named" in kluis("device", "name", "--profile", a2, this_device, "desk").stdout
    refused = kluis("device", "name", "--profile", a2, this_device, "bad\x1b[2Jname", check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "local_protocol" in refused.stderr and "control characters" in refused.stderr
    rows2 = {row[0]: row[1:] for row in listing(a2)}
    assert rows2[this_device] == ["certified", today, "desk"]

    lines = kluis("device", "list", "--profile", a, "--json").stdout.splitlines()
    as_json = {d["device"]: d for d in map(json.loads, lines)}
    assert as_json[second] == {
        "device": second,
        "status": "certified",
        "this_device": False,
        "name": "laptop",
        "since": today,
    }
    assert as_json[this_device]["this_device"] is True
