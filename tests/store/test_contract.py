"""What every server store must do (``server/store/protocol.py``), whatever it runs on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from kluis.protocol.frames import DeviceKeys, DeviceRecord, PendingLink, Revocation, SignedKey
from kluis.server.store.protocol import Account, Store, StoredDevice

NOW = 1_800_000_000
LATER = NOW + 86_400


def record(name: str, curve: str | None = None) -> DeviceRecord:
    keys = DeviceKeys(ed25519=f"ed-{name}", curve25519=curve or f"cv-{name}", seal="s", sig="x")
    return DeviceRecord(keys=keys, cert="c")


def key(n: int) -> SignedKey:
    return SignedKey(key_id=f"k{n}", key=f"key{n}", sig="x")


async def account_with(store: Store, name: str, *devices: str) -> str:
    """An account ``acc-<name>`` with its first device ``ed-<name>``, then ``devices``."""
    await store.add_licences([name.encode()], 30, NOW)
    account = await store.register(name.encode(), f"acc-{name}", f"id-{name}", record(name), NOW)
    assert account is not None
    for i, device in enumerate(devices):
        await store.put_link(f"tok-{device}", PendingLink(device=record(device).keys), LATER)
        assert await store.add_device(f"acc-{name}", record(device), f"tok-{device}", NOW + i)
    return account.id


# ---- licences and accounts ------------------------------------------------------------------


async def test_a_licence_registers_one_account_once(store: Store) -> None:
    await store.add_licences([b"code-1", b"code-2"], 182, NOW)
    account = await store.register(b"code-1", "acc", "identity", record("a"), NOW)
    assert account == Account("acc", NOW, NOW + 182 * 86_400, "identity")
    assert await store.account("acc") == account
    assert await store.register(b"code-1", "acc2", "identity2", record("b"), NOW) is None
    assert await store.register(b"unknown", "acc3", "identity3", record("c"), NOW) is None
    assert await store.account("acc2") is None and await store.device("ed-b") is None
    assert await store.device("ed-a") == StoredDevice("acc", record("a"), revoked=False)


# ---- devices --------------------------------------------------------------------------------


async def test_devices_are_added_through_a_link_and_listed_in_order(store: Store) -> None:
    account = await account_with(store, "a", "b", "c")
    assert [r.keys.ed25519 for r in await store.active_devices(account)] == [
        "ed-a",
        "ed-b",
        "ed-c",
    ]
    assert await store.count_devices(account) == 3
    # A link is consumed by its device: a second use finds nothing.
    assert not await store.add_device(account, record("d"), "tok-b", NOW)
    assert await store.device("ed-d") is None


async def test_a_curve_key_is_unique_server_wide(store: Store) -> None:
    await account_with(store, "a")
    assert await store.curve_in_use("cv-a")
    assert not await store.curve_in_use("cv-z")
    await store.add_licences([b"b"], 30, NOW)
    try:
        await store.register(b"b", "acc-b", "id-b", record("b", curve="cv-a"), NOW)
    except Exception:
        pass  # refused: and nothing of it was kept, the licence included
    else:  # pragma: no cover
        raise AssertionError("a second device with the same curve key was stored")
    assert await store.account("acc-b") is None
    assert await store.register(b"b", "acc-b", "id-b", record("b"), NOW) is not None


async def test_revoking_a_device_keeps_its_revocation_and_drops_what_it_held(
    store: Store,
) -> None:
    account = await account_with(store, "a", "b")
    await store.add_keys("ed-b", [key(1), key(2)], key(99))
    await store.write_envelopes([("ed-b", LATER, b"for b")], [])
    revocation = Revocation(device="ed-b", sig="sig", by_self=True)
    await store.revoke_device("ed-b", revocation)
    stored = await store.device("ed-b")
    assert stored is not None and stored.revoked and stored.account_id == account
    assert [r.keys.ed25519 for r in await store.active_devices(account)] == ["ed-a"]
    assert await store.count_devices(account) == 1
    assert await store.revocations(account) == [revocation]
    assert await store.count_one_time_keys("ed-b") == 0
    assert await store.claim_key("ed-b") is None
    assert await store.count_envelopes("ed-b") == 0
    assert await store.envelopes_after("ed-b", 0, NOW, 10) == []


# ---- links ----------------------------------------------------------------------------------


async def test_links_expire(store: Store) -> None:
    link = PendingLink(device=record("n").keys, one_time_keys=[key(1)], fallback_key=key(9))
    await store.put_link("tok", link, NOW + 600)
    assert await store.link("tok", NOW) == link
    assert await store.count_links(NOW) == 1
    assert await store.link("tok", NOW + 600) is None
    assert await store.count_links(NOW + 600) == 0
    assert await store.link("other", NOW) is None
    assert await store.sweep(NOW + 600) == (0, 1)
    assert await store.link("tok", NOW) is None  # deleted, not only hidden


async def test_an_approved_device_gets_the_keys_of_its_link(store: Store) -> None:
    account = await account_with(store, "a")
    link = PendingLink(device=record("b").keys, one_time_keys=[key(1)], fallback_key=key(9))
    await store.put_link("tok", link, LATER)
    assert await store.add_device(account, record("b"), "tok", NOW)
    assert await store.count_one_time_keys("ed-b") == 1
    assert await store.claim_key("ed-b") == (key(1), False)
    assert await store.claim_key("ed-b") == (key(9), True)


# ---- keys -----------------------------------------------------------------------------------


async def test_one_time_keys_are_claimed_once_then_the_fallback(store: Store) -> None:
    assert await store.claim_key("dev") is None
    assert await store.fallback_key("dev") is None
    assert await store.add_keys("dev", [key(1), key(2)], None) == 2
    assert await store.add_keys("dev", [key(2), key(3)], key(9)) == 3  # a known id is ignored
    claimed = {(await store.claim_key("dev") or (None, None))[0] for _ in range(3)}
    assert claimed == {key(1), key(2), key(3)}
    assert await store.count_one_time_keys("dev") == 0
    assert await store.claim_key("dev") == (key(9), True)  # reusable
    assert await store.claim_key("dev") == (key(9), True)
    assert await store.fallback_key("dev") == (key(9), True)
    await store.add_keys("dev", [], key(10))  # a new fallback replaces the old one
    assert await store.fallback_key("dev") == (key(10), True)


async def test_concurrent_claims_never_hand_out_a_key_twice(store: Store) -> None:
    await store.add_keys("dev", [key(n) for n in range(20)], key(99))
    claims = await asyncio.gather(*(store.claim_key("dev") for _ in range(30)))
    one_time = [c[0] for c in claims if c is not None and not c[1]]
    assert sorted(k.key_id for k in one_time) == sorted(f"k{n}" for n in range(20))
    assert sum(1 for c in claims if c == (key(99), True)) == 10


# ---- envelopes ------------------------------------------------------------------------------


async def test_sequence_numbers_count_per_device_and_are_never_reused(store: Store) -> None:
    ids = await store.write_envelopes(
        [("a", LATER, b"a1"), ("b", LATER, b"b1"), ("a", LATER, b"a2")], []
    )
    a1, b1, a2 = ids
    assert a2 == a1 + 1
    # Acknowledging everything does not let a number come back (a counter, not MAX + 1).
    await store.write_envelopes([], [("a", a1), ("a", a2), ("b", b1)])
    assert await store.count_envelopes("a") == 0
    (a3,) = await store.write_envelopes([("a", LATER, b"a3")], [])
    assert a3 == a2 + 1
    (b2, a4) = await store.write_envelopes([("b", LATER, b"b2"), ("a", LATER, b"a4")], [])
    assert (b2, a4) == (b1 + 1, a3 + 1)


async def test_concurrent_writes_number_envelopes_without_a_gap(store: Store) -> None:
    batches = await asyncio.gather(
        *(store.write_envelopes([("d", LATER, b"%d" % i)], []) for i in range(20))
    )
    ids = sorted(i for batch in batches for i in batch)
    assert ids == list(range(ids[0], ids[0] + 20))


async def test_envelopes_are_read_in_order_by_count_and_by_bytes(store: Store) -> None:
    bodies = [bytes([n]) * size for n, size in enumerate((10, 2_000, 30_000, 5, 100_000))]
    ids = await store.write_envelopes([("d", LATER, b) for b in bodies], [])
    assert await store.envelopes_after("d", 0, NOW, 100) == list(zip(ids, bodies, strict=True))
    assert await store.envelopes_after("d", ids[0], NOW, 2) == [
        (ids[1], bodies[1]),
        (ids[2], bodies[2]),
    ]
    # At most max_bytes of bodies, but the first envelope always.
    assert [i for i, _ in await store.envelopes_after("d", 0, NOW, 100, 2_010)] == ids[:2]
    assert [i for i, _ in await store.envelopes_after("d", ids[1], NOW, 100, 1)] == [ids[2]]
    assert await store.envelopes_after("d", ids[-1], NOW, 100) == []
    assert await store.envelopes_after("other", 0, NOW, 100) == []
    assert await store.count_envelopes("d") == 5
    assert await store.envelope_bytes("d") >= 0  # an upper-bound helper for quotas


async def test_a_device_deletes_only_its_own_envelopes(store: Store) -> None:
    (a1, b1) = await store.write_envelopes([("a", LATER, b"x"), ("b", LATER, b"y")], [])
    await store.write_envelopes([], [("a", b1), ("c", b1)])  # b's number, under other devices
    assert await store.envelopes_after("b", 0, NOW, 10) == [(b1, b"y")]
    await store.write_envelopes([], [("a", a1)])
    assert await store.count_envelopes("a") == 0
    assert await store.count_envelopes("b") == 1


async def test_one_write_stores_and_deletes_in_one_transaction(store: Store) -> None:
    (first,) = await store.write_envelopes([("d", LATER, b"one")], [])
    (second,) = await store.write_envelopes([("d", LATER, b"two")], [("d", first)])
    assert await store.envelopes_after("d", 0, NOW, 10) == [(second, b"two")]


async def test_expired_envelopes_are_never_handed_out_and_are_swept(store: Store) -> None:
    ids = await store.write_envelopes(
        [("d", NOW + 10, b"short" * 500), ("d", LATER, b"long"), ("e", NOW + 10, b"e")], []
    )
    assert [i for i, _ in await store.envelopes_after("d", 0, NOW + 10, 10)] == [ids[1]]
    assert await store.sweep(NOW + 10) == (2, 0)
    assert await store.count_envelopes("d") == 1 and await store.count_envelopes("e") == 0
    assert await store.envelopes_after("d", 0, NOW, 10) == [(ids[1], b"long")]
    await store.maintenance()  # housekeeping runs whenever the server asks, harmlessly


async def test_a_store_reopened_keeps_its_state_and_continues_its_numbers(
    opener: Callable[[], Store],
) -> None:
    store = opener()
    account = await account_with(store, "a")
    await store.add_keys("ed-a", [key(1)], None)
    (first,) = await store.write_envelopes([("d", LATER, b"one")], [])
    await store.write_envelopes([], [("d", first)])  # nothing stored, the counter remains
    await store.close()

    store = opener()
    try:
        assert await store.account(account) is not None
        assert await store.count_one_time_keys("ed-a") == 1
        (second,) = await store.write_envelopes([("d", LATER, b"two")], [])
        assert second == first + 1
        assert await store.envelopes_after("d", 0, NOW, 10) == [(second, b"two")]
    finally:
        await store.close()


# ---- footprint ------------------------------------------------------------------------------


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


async def test_the_footprint_names_every_file_the_store_writes(
    opener: Callable[[], Store], tmp_path: Path
) -> None:
    """The seizure audit reads exactly ``footprint()``: a file the store writes in its folder
    (``tmp_path`` here) and leaves out of it would escape the audit."""
    store = opener()
    footprint = store.footprint()
    assert footprint == list(dict.fromkeys(footprint))  # no file twice
    assert all(p.is_absolute() for p in footprint)
    try:
        await account_with(store, "a", "b")
        ids = await store.write_envelopes([("ed-b", LATER, b"x" * 50_000)], [])
        assert files_under(tmp_path) <= set(footprint)  # live: the WAL and its index too
        await store.write_envelopes([], [("ed-b", ids[0])])
        await store.sweep(LATER + 1)
        await store.maintenance()
        assert files_under(tmp_path) <= set(footprint)
    finally:
        await store.close()
    assert files_under(tmp_path) <= set(footprint)
    reopened = opener()
    try:
        assert reopened.footprint() == footprint  # a property of where it is, not of a run
    finally:
        await reopened.close()


# ---- operator: renewals, account flags, wipe orders -------------------------------------------


async def test_a_renewal_adds_the_licence_days_to_the_later_of_now_and_the_end(
    store: Store,
) -> None:
    account = await account_with(store, "a")  # ends at NOW + 30 days
    await store.add_plan_licences([b"r1", b"r2"], 10, "10-days", NOW)
    assert await store.renew(b"r1", account, NOW) == NOW + 40 * 86_400  # before the end: adds
    assert await store.renew(b"r1", account, NOW) is None  # single use
    much_later = NOW + 100 * 86_400
    assert await store.renew(b"r2", account, much_later) == much_later + 10 * 86_400
    await store.add_plan_licences([b"r3"], 10, "10-days", NOW)
    assert await store.renew(b"r3", "no-such-account", NOW) is None
    assert await store.renew(b"r3", account, NOW) is not None  # the refusal did not use it


async def test_account_flags_and_wipe_orders(store: Store) -> None:
    account = await account_with(store, "a", "b")
    stored = await store.account(account)
    assert stored is not None and not stored.suspended and stored.operator_wipe
    assert await store.set_account_flag(account, "suspended", True)
    assert await store.set_account_flag(account, "operator_wipe", False)
    stored = await store.account(account)
    assert stored is not None and stored.suspended and not stored.operator_wipe
    assert not await store.set_account_flag("nobody", "suspended", True)
    assert sorted(await store.all_active_devices()) == ["ed-a", "ed-b"]
    assert await store.wipe_order("ed-b") is None
    await store.put_wipe("ed-b", b"order")
    assert await store.wipe_order("ed-b") == b"order"
