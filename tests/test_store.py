"""The encrypted profile store."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from kluis.client.store import ProfileStore
from kluis.crypto.profile_key import new_params
from kluis.errors import DecryptionError, LocalProtocolError, WrongPassphrase

FAST = new_params(time_cost=1, memory_kib=8192)


def test_wrong_passphrase_is_a_clear_error(tmp_path: Path) -> None:
    store = ProfileStore.create(tmp_path / "p", "right", FAST)
    store.put("k", b"secret value")
    store.close()
    with pytest.raises(WrongPassphrase):
        ProfileStore.open(tmp_path / "p", "wrong")
    store = ProfileStore.open(tmp_path / "p", "right")
    assert store.get("k") == b"secret value"
    store.close()


def test_nothing_readable_on_disk(tmp_path: Path) -> None:
    store = ProfileStore.create(tmp_path / "p", "pw", FAST)
    store.put("identity", b"PLAINTEXT-IDENTITY")
    store.add_message("peer-id-123", b"PLAINTEXT-MESSAGE")
    store.save_session(None, "peer-curve-key", b"PLAINTEXT-SESSION", 1)
    store.close()
    for path in (tmp_path / "p").iterdir():
        data = path.read_bytes()
        for s in (b"PLAINTEXT", b"peer-id-123", b"peer-curve-key"):
            assert s not in data, path


def test_records_cannot_be_swapped(tmp_path: Path) -> None:
    import sqlite3

    store = ProfileStore.create(tmp_path / "p", "pw", FAST)
    store.put("a", b"value a")
    store.put("b", b"value b")
    store.close()
    db = sqlite3.connect(tmp_path / "p" / ProfileStore.DB)
    (va,) = db.execute("SELECT value FROM kv WHERE name = 'a'").fetchone()
    db.execute("UPDATE kv SET value = ? WHERE name = 'b'", (va,))
    db.commit()
    db.close()
    store = ProfileStore.open(tmp_path / "p", "pw")
    with pytest.raises(DecryptionError):
        store.get("b")
    store.close()


def test_transaction_rolls_back_everything(tmp_path: Path) -> None:
    store = ProfileStore.create(tmp_path / "p", "pw", FAST)
    with pytest.raises(RuntimeError), store.transaction():
        store.put("x", b"1")
        store.add_message("peer", b"m")
        raise RuntimeError("crash in the middle")
    assert store.get("x") is None and store.messages() == []
    store.close()


def test_create_twice_and_open_missing(tmp_path: Path) -> None:
    ProfileStore.create(tmp_path / "p", "pw", FAST).close()
    with pytest.raises(LocalProtocolError):
        ProfileStore.create(tmp_path / "p", "pw", FAST)
    with pytest.raises(LocalProtocolError):
        ProfileStore.open(tmp_path / "missing", "pw")


def test_caches_follow_writes_by_another_connection(tmp_path: Path) -> None:
    """Two processes may hold one profile (``kluis send`` while ``kluis listen`` runs): what one
    writes, the other reads, inside a transaction and out of one, despite its caches."""
    one = ProfileStore.create(tmp_path / "p", "pw", FAST)
    two = ProfileStore.open(tmp_path / "p", "pw")
    one.put("pins:x", b"v1")
    row = one.save_session(None, "acct/dev", b"s1", 1)
    assert two.get("pins:x") == b"v1" and two.sessions("acct/dev") == [(row, b"s1")]
    one.put("pins:x", b"v2")
    one.save_session(row, "acct/dev", b"s2", 2)
    assert two.get("pins:x") == b"v2"
    with two.transaction():  # the session a message would be encrypted with: the latest
        assert two.sessions("acct/dev") == [(row, b"s2")]
        two.save_session(row, "acct/dev", b"s3", 3)
    assert one.sessions("acct/dev") == [(row, b"s3")]
    one.drop_sessions("acct/dev")
    assert two.sessions("acct/dev") == []
    one.close()
    two.close()


def test_a_rollback_leaves_no_cached_value(tmp_path: Path) -> None:
    store = ProfileStore.create(tmp_path / "p", "pw", FAST)
    store.put("k", b"old")
    row = store.save_session(None, "peer", b"s1", 1)
    assert store.get("k") == b"old" and store.sessions("peer") == [(row, b"s1")]  # cached
    with pytest.raises(RuntimeError), store.transaction():
        store.put("k", b"new")
        store.save_session(row, "peer", b"s2", 2)
        assert store.get("k") == b"new"
        raise RuntimeError
    assert store.get("k") == b"old" and store.sessions("peer") == [(row, b"s1")]
    store.close()


class _FailingCommit:
    """A profile's connection whose COMMIT fails (a full disk, an I/O error)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            raise sqlite3.OperationalError("disk I/O error (simulated)")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.db, name)


def test_a_failed_commit_keeps_nothing_and_the_profile_goes_on(tmp_path: Path) -> None:
    store = ProfileStore.create(tmp_path / "p", "pw", FAST)
    store.put("k", b"old")
    store.add_message("peer", b"m1")
    real = store._db
    store._db = _FailingCommit(real)  # type: ignore[assignment]
    with pytest.raises(sqlite3.OperationalError), store.transaction():
        store.put("k", b"new")
        store.add_message("peer", b"lost")
    store._db = real
    assert store.get("k") == b"old" and store.messages() == [b"m1"]
    store.add_message("peer", b"m2")
    assert store.messages() == [b"m1", b"m2"]
    store.close()


def test_a_profile_made_without_parameters_gets_the_full_argon2id_cost(tmp_path: Path) -> None:
    """Tests lower the KDF's cost for speed (``tests.kluis_testing.fast_kdf``) only by passing
    parameters; without them, as the CLI and KluisClient do, a profile gets the defaults."""
    import json

    ProfileStore.create(tmp_path / "p", "pw").close()
    kdf = json.loads((tmp_path / "p" / ProfileStore.META).read_bytes())["kdf"]
    defaults = new_params()
    assert (kdf["time_cost"], kdf["memory_kib"]) == (defaults.time_cost, defaults.memory_kib)
    assert (defaults.time_cost, defaults.memory_kib) == (3, 64 * 1024)
