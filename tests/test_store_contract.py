"""The client store protocol: every implementation keeps the same contract.

Parametrised over the encrypted SQLite profile and the in-memory store; a new store joins the
``store`` fixture and must pass unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kluis.client.store import ClientStore, MemoryStore, ProfileStore
from kluis.crypto.profile_key import new_params


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ClientStore]:
    s: ClientStore
    if request.param == "sqlite":
        s = ProfileStore.create(tmp_path / "p", "pw", new_params(time_cost=1, memory_kib=8192))
    else:
        s = MemoryStore()
    yield s
    s.close()


def test_named_records(store: ClientStore) -> None:
    assert store.get("a") is None
    store.put("q:1", b"one")
    store.put("q:2", b"two")
    store.put("r:1", b"other")
    store.put("q:1", b"uno")
    assert store.get("q:1") == b"uno"
    assert sorted(store.names("q:")) == ["q:1", "q:2"]
    assert len(store.pickle_key) == 32
    assert store.blind("x") == store.blind(b"x") != store.blind("y")


def test_sessions_most_recently_used_first(store: ClientStore) -> None:
    a = store.save_session(None, "acct/dev", b"A", 10)
    b = store.save_session(None, "acct/dev", b"B", 20)
    store.save_session(None, "acct/other", b"C", 30)
    assert store.sessions("acct/dev") == [(b, b"B"), (a, b"A")]
    assert store.save_session(a, "acct/dev", b"A2", 40) == a
    assert store.sessions("acct/dev") == [(a, b"A2"), (b, b"B")]
    store.drop_sessions("acct/dev")
    assert store.sessions("acct/dev") == []
    assert [v for _, v in store.sessions("acct/other")] == [b"C"]


def test_history_and_seen(store: ClientStore) -> None:
    store.add_message("p1", b"m1")
    store.add_message("p2", b"m2")
    store.add_message("p1", b"m3")
    assert store.messages("p1") == [b"m1", b"m3"]
    assert store.messages() == [b"m1", b"m2", b"m3"]
    rows = store.message_rows()
    first = rows[0][0]
    assert store.message_rows(after=first) == rows[1:]  # only what came after a seq
    assert [v for _, v in store.message_rows("p1", after=first)] == [b"m3"]
    assert store.message_rows(after=rows[-1][0]) == []
    assert not store.seen(b"t")
    store.mark_seen(b"t")
    store.mark_seen(b"t")
    assert store.seen(b"t")


def test_a_failed_transaction_leaves_nothing(store: ClientStore) -> None:
    store.put("kept", b"1")
    row = store.save_session(None, "peer", b"v1", 1)
    with pytest.raises(RuntimeError), store.transaction():
        store.put("kept", b"2")
        store.put("new", b"x")
        with store.transaction():  # nested: joins the outer one
            store.save_session(row, "peer", b"v2", 2)
            store.save_session(None, "peer", b"v3", 3)
            store.add_message("peer", b"m")
            store.mark_seen(b"t")
        raise RuntimeError
    assert store.get("kept") == b"1" and store.get("new") is None
    assert store.sessions("peer") == [(row, b"v1")]
    assert store.messages() == [] and not store.seen(b"t")
    with store.transaction():
        store.put("new", b"y")
    assert store.get("new") == b"y"


def test_a_savepoint_rolls_back_only_its_own_writes(store: ClientStore) -> None:
    row = store.save_session(None, "peer", b"v1", 1)
    with store.transaction():
        store.put("before", b"1")
        with pytest.raises(RuntimeError), store.savepoint():
            store.put("inside", b"x")
            store.save_session(row, "peer", b"v2", 2)
            store.add_message("peer", b"rolled back")
            store.mark_seen(b"t")
            with store.transaction():  # nested: joins the savepoint
                store.put("before", b"2")
            raise RuntimeError
        with store.savepoint():
            store.add_message("peer", b"kept")
        store.put("after", b"3")
    assert store.get("before") == b"1" and store.get("inside") is None
    assert store.get("after") == b"3"
    assert store.sessions("peer") == [(row, b"v1")]
    assert store.messages() == [b"kept"] and not store.seen(b"t")
    with pytest.raises(RuntimeError), store.savepoint():  # outside a transaction: it is one
        store.put("alone", b"x")
        raise RuntimeError
    assert store.get("alone") is None
    store.add_message("peer", b"later")
    assert store.messages() == [b"kept", b"later"]
