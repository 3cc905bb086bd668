"""What the console's store (``server/admin/store.py``) must do beside every server store: the
same answers, in the same order, on SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib

from kluis.protocol.frames import PendingLink
from kluis.server.admin.store import AdminStore, admin_store_for
from kluis.server.store.protocol import Store
from tests.store.test_contract import LATER, NOW, record


def admin_of(store: Store) -> AdminStore:
    admin = admin_store_for(store)
    assert admin is not None
    return admin


async def test_counts_accounts_and_resellers_in_one_order(store: Store) -> None:
    admin = admin_of(store)
    # Byte order, whatever the database's collation: '-' < '.' < letters.
    for name in ("ab", "a.b", "a-c"):
        assert await admin.create_user(name, "reseller", "h", b"t", 10, NOW, "boss")
    assert not await admin.create_user("ab", "admin", "h", b"t", 0, NOW, "boss")  # taken
    assert await admin.issue_licences([b"op1", b"op2"], 30, NOW, "boss", None)
    assert await admin.issue_licences([b"ab1", b"ab2"], 7, NOW, "ab", "ab")
    assert await admin.issue_licences([b"ac1"], 30, NOW, "a-c", "a-c")
    assert not await admin.issue_licences([bytes([i]) for i in range(9)], 7, NOW, "ab", "ab")

    counts = [(c.reseller, c.days, c.count) for c in await admin.licence_counts(None, True)]
    assert counts == [(None, 30, 2), ("a-c", 30, 1), ("ab", 7, 2)]
    assert [(c.reseller, c.count) for c in await admin.licence_counts("ab", False)] == [("ab", 2)]
    assert [(c.reseller, c.count) for c in await admin.licence_counts(None, False)] == [(None, 2)]

    # Redeemed from the reseller's codes: an account with two devices, one from the operator's.
    account = await store.register(b"ab1", "acc-b", "id-b", record("b1"), NOW)
    assert account is not None
    await store.put_link("tok", PendingLink(device=record("b2").keys), LATER)
    assert await store.add_device("acc-b", record("b2"), "tok", NOW)
    assert await store.register(b"op1", "acc-a", "id-a", record("a1"), NOW) is not None
    await store.seen("acc-a", NOW // 86_400)
    await store.set_account_flag("acc-a", "suspended", True)

    rows = await admin.accounts(None, True)
    assert [(r.id, r.devices, r.reseller, r.suspended) for r in rows] == [
        ("acc-a", 1, None, True),
        ("acc-b", 2, "ab", False),
    ]
    assert rows[0].last_seen_day == NOW // 86_400 and rows[1].last_seen_day is None
    assert [r.id for r in await admin.accounts("ab", False)] == ["acc-b"]
    assert await admin.accounts("a-c", False) == []
    resellers = [(r.name, r.quota, r.issued, r.accounts) for r in await admin.resellers()]
    assert resellers == [("a-c", 10, 1, 0), ("a.b", 10, 0, 0), ("ab", 10, 2, 1)]


async def test_sessions_and_the_audit_log(store: Store) -> None:
    admin = admin_of(store)
    assert await admin.create_user("boss", "admin", "h", b"t", 0, NOW, "cli")
    token = hashlib.sha256(b"token").digest()
    await admin.start_session(token, "boss", NOW + 60, NOW)
    user = await admin.session_user(token, NOW + 59)
    assert user is not None and (user.name, user.role, user.totp) == ("boss", "admin", b"t")
    assert await admin.session_user(token, NOW + 60) is None  # expired
    assert await admin.session_user(hashlib.sha256(b"other").digest(), NOW) is None
    await admin.end_session(token, "boss", NOW + 1)
    assert await admin.session_user(token, NOW + 2) is None
    assert await admin.use_totp_step("boss", 5) and not await admin.use_totp_step("boss", 5)
    assert not await admin.use_totp_step("boss", 4) and await admin.use_totp_step("boss", 6)
    assert not await admin.use_totp_step("nobody", 7)

    await admin.audit("boss", "announce", "first", NOW + 3)
    await admin.audit("shop", "log in", "", NOW + 4)
    await admin.audit("boss", "announce", "second", NOW + 5)
    log = [(e.actor, e.action, e.detail) for e in await admin.audit_log(None)]
    assert log == [
        ("boss", "announce", "second"),
        ("shop", "log in", ""),
        ("boss", "announce", "first"),
        ("boss", "log out", ""),
        ("boss", "log in", ""),
        ("cli", "create user", "admin boss"),
    ]
    assert [e.actor for e in await admin.audit_log("shop")] == ["shop"]
    assert [e.detail for e in await admin.audit_of("announce", limit=1)] == ["second"]
    assert [e.at for e in await admin.audit_log(None, limit=2)] == [NOW + 5, NOW + 4]
