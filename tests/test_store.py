"""The encrypted profile store."""

from __future__ import annotations

from pathlib import Path

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
