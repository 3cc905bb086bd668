"""The sans-IO layers stay free of I/O: ``ruff check`` refuses an I/O import there.

Runs ruff on a probe module given on stdin under a path in each guarded layer (nothing is written
to the tree), so that dropping or narrowing the rule in pyproject.toml fails this test.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ruff")

ROOT = Path(__file__).resolve().parents[1]
PROBE = """\
import asyncio
import os
import socket
import sqlite3
import time

import aiohttp

_ = (asyncio, os, socket, sqlite3, time, aiohttp)
"""
RUFF = [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format=concise"]
BANNED = {"asyncio", "os", "socket", "sqlite3", "time", "aiohttp"}


def banned_imports(path: str, source: str = PROBE) -> set[str]:
    """The modules ruff reports as banned in ``source`` if it lived at ``path``."""
    result = subprocess.run(
        [*RUFF, "--stdin-filename", path, "-"],
        input=source,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    found = set()
    for line in result.stdout.splitlines():
        if "TID251" in line:
            found.add(line.split("`")[1])
    return found


@pytest.mark.parametrize(
    "path",
    [
        "src/kluis/client/core.py",
        "src/kluis/client/verification.py",
        "src/kluis/client/backoff.py",
        "src/kluis/protocol/_probe.py",
        "src/kluis/crypto/_probe.py",
        "src/kluis/identity/sub/_probe.py",
    ],
)
def test_io_imports_fail_lint_in_sans_io_layers(path: str) -> None:
    assert banned_imports(path) == BANNED


def test_the_core_may_not_reach_for_the_sqlite_profile() -> None:
    probe = "from kluis.client.store.sqlite import ProfileStore\n\n_ = ProfileStore\n"
    assert banned_imports("src/kluis/client/core.py", probe) == {"kluis.client.store.sqlite"}


@pytest.mark.parametrize(
    "path", ["src/kluis/client/client.py", "src/kluis/client/store/sqlite.py", "tests/_probe.py"]
)
def test_io_layers_may_import_io(path: str) -> None:
    assert banned_imports(path) == set()


# The boundaries to vodozemac: each wraps its objects and translates its exceptions.
VODOZEMAC_BOUNDARIES = {
    "src/kluis/crypto/olm.py",
    "src/kluis/crypto/megolm.py",
    "src/kluis/crypto/sas.py",
}


def test_only_the_crypto_boundaries_import_vodozemac() -> None:
    importers = set()
    for path in sorted((ROOT / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "vodozemac" or n.startswith("vodozemac.") for n in names):
                importers.add(str(path.relative_to(ROOT)))
    assert importers == VODOZEMAC_BOUNDARIES


def test_errors_are_matched_by_class_not_by_code() -> None:
    """Outside errors.py, an error's kind is its class: ``isinstance``, never ``.code == "..."``."""
    compare = re.compile(r"""\.code\s*(==|!=)|(==|!=)\s*\w+\.code\b""")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted((ROOT / "src").rglob("*.py"))
        if path.name != "errors.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if compare.search(line)
    ]
    assert offenders == []
