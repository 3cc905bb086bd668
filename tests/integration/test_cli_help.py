"""Every help text of the CLI states its defaults and units: walked over the real parser, and
``--help`` run as a process once (what a user sees)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

from kluis.apps.cli import build_parser

# words that say what a number counts; an option that takes a number names one
UNITS = ("second", "minute", "hour", "day", "byte", "KiB", "MiB", "how many", "port", "count")


def parsers(
    parser: argparse.ArgumentParser, path: str = "kluis"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, f"{path} {name}")


def options() -> Iterator[tuple[str, argparse.Action]]:
    for path, parser in parsers(build_parser()):
        for action in parser._actions:
            if action.option_strings and not isinstance(
                action, argparse._HelpAction | argparse._VersionAction
            ):
                yield f"{path} {action.option_strings[-1]}", action


def shown(action: argparse.Action) -> str:
    """The help line as argparse prints it (``%(default)s`` filled in), with the metavar."""
    text = (action.help or "") % {"default": action.default, "prog": "kluis"}
    return f"{action.metavar or ''} {text}"


def test_every_option_with_a_default_states_it() -> None:
    missing = []
    for name, action in options():
        if action.help == argparse.SUPPRESS or action.nargs == 0:
            continue  # flags: off unless given
        if action.default in (None, [], argparse.SUPPRESS) or action.required:
            continue
        if "default" not in shown(action):
            missing.append(name)
    assert missing == []


def test_every_number_states_its_unit() -> None:
    missing = []
    for name, action in options():
        if action.type in (int, float) or getattr(action.type, "__name__", "") == "_port":
            text = shown(action)
            if not any(unit.lower() in text.lower() for unit in UNITS):
                missing.append(name)
    assert missing == []


def test_every_option_has_help() -> None:
    assert [name for name, action in options() if not action.help] == []


def test_help_runs_without_a_traceback() -> None:
    for args in (["--help"], ["send", "--help"], ["serve", "--help"], ["inbox", "--help"]):
        proc = subprocess.run(
            [sys.executable, "-m", "kluis.apps.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert "usage: kluis" in proc.stdout
    assert "(default 0)" in proc.stdout and "seconds" in proc.stdout  # inbox --wait


def test_the_server_defaults_in_the_help_are_the_real_ones() -> None:
    from kluis.server.config import DAY, Limits

    limits = Limits()
    helps = {name: shown(action) for name, action in options()}
    assert f"(default {limits.envelope_ttl_s // DAY})" in helps["kluis serve --envelope-ttl-days"]
    assert f"(default {limits.mailbox_quota})" in helps["kluis serve --mailbox-quota"]
    assert f"(default {limits.max_frame_bytes}:" in helps["kluis serve --max-frame-bytes"]
    assert f"(default {limits.send_rate_per_s:g};" in helps["kluis serve --send-rate"]
    assert limits.send_burst == limits.send_rate_per_s * 10  # "burst 10 s"
