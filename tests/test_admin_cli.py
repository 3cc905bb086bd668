"""``kluis admin ... --database URL`` in process: console users in a PostgreSQL database with
the keys in ``--data``, and a typed error, naming no password, for each bad input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kluis.apps.cli import main
from tests.postgres import scratch_database

UNREACHABLE = "postgresql://kluis:hunter2-secret@127.0.0.1:1/kluis"


@pytest.fixture
def pg_url() -> Iterator[str]:
    with scratch_database() as url:
        yield url


@pytest.fixture(autouse=True)
def password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLUIS_ADMIN_PASSWORD", "a long enough password")


def test_create_user_in_postgres_with_the_key_in_data(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["admin", "create-user", "--data", str(tmp_path), "--database", pg_url]
    assert main([*args, "boss"]) == 0
    assert capsys.readouterr().out.startswith("otpauth://totp/Kluis:boss?secret=")
    assert (tmp_path / "admin.key").exists() and not (tmp_path / "kluis.sqlite3").exists()
    assert main([*args, "boss"]) == 1
    assert "exists already" in capsys.readouterr().err
    assert main([*args, "shop", "--role", "reseller", "--quota", "5"]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["admin", "create-user", "--database", "mysql://x/y", "boss"], "postgresql://"),
        (["admin", "create-user", "--database", UNREACHABLE, "boss"], "cannot reach"),
        (["admin", "account", "suspend", "--database", UNREACHABLE, "X"], "cannot reach"),
        (["admin", "announce", "--database", "sqlite:///x", "hello"], "postgresql://"),
    ],
)
def test_bad_database_urls_are_typed_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if argv[1] == "announce":  # announce loads the operator key first
        assert main(["admin", "init", "--data", str(tmp_path)]) == 0
        capsys.readouterr()
    assert main([*argv[:2], "--data", str(tmp_path), *argv[2:]]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "hunter2" not in err


def test_create_user_on_postgres_needs_an_existing_data_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "typo"
    argv = ["admin", "create-user", "--data", str(missing), "--database", UNREACHABLE, "boss"]
    assert main(argv) == 1
    assert "not a folder" in capsys.readouterr().err
    assert not missing.exists()  # no second admin.key made by a typo
