"""`kluis group ...` and group messages in `send`/`inbox`, exactly as documented."""

from __future__ import annotations

import re
from pathlib import Path

from tests.integration.test_cli import kluis
from tests.kluis_testing import ServerProcess

GROUP_LINE = re.compile(r"^(g[a-z2-7]{24})/([a-z2-7]{16})\t(\S+)\t(.*)$")


def group_lines(out: str) -> list[tuple[str, str, str]]:
    parsed = []
    for line in out.splitlines():
        m = GROUP_LINE.match(line)
        assert m, f"not 'GROUP/SENDER<TAB>time<TAB>text': {line!r}"
        parsed.append((m.group(1), m.group(2), m.group(4)))
    return parsed


def test_cli_group_create_send_remove_leave(server: ServerProcess, tmp_path: Path) -> None:
    codes = kluis("licence", "create", "--data", str(server.data), "--count", "3").stdout.split()
    a, b, c = (str(tmp_path / n) for n in ("alice", "bob", "carol"))
    alice, bob, carol = (
        kluis("register", "--server", server.url, "--licence", code, "--profile", p).stdout.strip()
        for code, p in zip(codes, (a, b, c), strict=True)
    )

    group = kluis("group", "create", "--profile", a, "team", bob, carol).stdout.strip()
    assert re.fullmatch(r"g[a-z2-7]{24}", group)
    assert group_lines(kluis("inbox", "--profile", b).stdout) == [
        (group, alice, '* created the group "team"')
    ]
    members = kluis("group", "members", "--profile", b, group).stdout.splitlines()
    assert members[0] == f"{group}\tteam"
    assert sorted(line.split("\t")[0] for line in members[1:]) == sorted([alice, bob, carol])

    kluis("send", "--profile", a, group, "hello group")
    assert group_lines(kluis("inbox", "--profile", b).stdout) == [(group, alice, "hello group")]
    assert group_lines(kluis("inbox", "--profile", c).stdout) == [
        (group, alice, '* created the group "team"'),
        (group, alice, "hello group"),
    ]

    # A file to the group, and a message read from standard input.
    (tmp_path / "notes.txt").write_bytes(b"x" * 1234)
    kluis("send", "--profile", a, group, "--file", str(tmp_path / "notes.txt"))
    kluis("send", "--profile", a, group, "-", stdin="line one\nline two")
    assert group_lines(kluis("inbox", "--profile", b).stdout) == [
        (group, alice, "[file] notes.txt (1234 bytes)"),
        (group, alice, "line one\\nline two"),  # a line break shown escaped: one line each
    ]
    saved = kluis("fetch", "--profile", b, "--out", str(tmp_path / "files")).stdout.split()
    assert saved == [str(tmp_path / "files" / "notes.txt")]
    assert (tmp_path / "files" / "notes.txt").read_bytes() == b"x" * 1234
    assert kluis("fetch", "--profile", b, "--out", str(tmp_path / "files")).stdout == ""
    kluis("inbox", "--profile", c)

    kluis("group", "remove", "--profile", a, group, carol)
    (removed,) = group_lines(kluis("inbox", "--profile", c).stdout)
    assert removed[:2] == (group, alice) and "removed" in removed[2]
    kluis("send", "--profile", a, group, "without carol")
    assert kluis("inbox", "--profile", c).stdout == ""
    got = group_lines(kluis("inbox", "--profile", b).stdout)
    assert got[-1] == (group, alice, "without carol")
    refused = kluis("send", "--profile", c, group, "let me in", check=False)
    assert refused.returncode == 1 and "no longer a member" in refused.stderr

    kluis("group", "leave", "--profile", b, group)
    assert group_lines(kluis("inbox", "--profile", a).stdout) == [(group, bob, "* left the group")]
    assert kluis("group", "members", "--profile", a, group).stdout.splitlines()[1:] == [
        f"{alice}\t(you)"
    ]
