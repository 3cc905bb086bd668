"""Server rules with an injected clock: subscriptions, expiry of envelopes and links, rates."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kluis.crypto.account_key import AccountKey
from kluis.crypto.olm import OlmAccount
from kluis.crypto.seal import SealKeyPair
from kluis.errors import AccountExpired, BadSignature, LicenceInvalid, LinkInvalid
from kluis.identity.chain import account_id_for, certify
from kluis.protocol import signing
from kluis.protocol.frames import DeviceKeys, DeviceRecord, PendingLink
from kluis.server.accounts import Accounts, licence_hash, normalise_licence
from kluis.server.config import DAY, Limits
from kluis.server.delivery.memory import InProcessBus
from kluis.server.operator.subscriptions import Subscriptions
from kluis.server.ratelimit import TokenBucket
from kluis.server.store.protocol import Account
from kluis.server.store.sqlite import SqliteStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


ORIGIN = "http://127.0.0.1:8448"


def device() -> tuple[OlmAccount, DeviceKeys]:
    acct = OlmAccount()
    seal = SealKeyPair().public
    sig = acct.sign(signing.device_keys_message(acct.ed25519, acct.curve25519, seal))
    return acct, DeviceKeys(ed25519=acct.ed25519, curve25519=acct.curve25519, seal=seal, sig=sig)


def login(acct: OlmAccount, nonce: bytes) -> str:
    return acct.sign(signing.challenge_message(nonce, acct.ed25519, ORIGIN))


async def register(
    accounts: Accounts, code: str, acct: OlmAccount, keys: DeviceKeys, nonce: bytes, sig: str
) -> Account:
    identity = AccountKey()
    record = certify(identity, account_id_for(identity.public), keys)
    return await accounts.register(code, identity.public, record, nonce, sig)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[SqliteStore, Accounts, Clock]]:
    clock = Clock()
    store = SqliteStore(tmp_path / "db.sqlite3")
    yield store, Accounts(store, clock, Limits(link_ttl_s=600), ORIGIN), clock
    await store.close()


async def test_subscription_ends_after_its_days(world: tuple[SqliteStore, Accounts, Clock]) -> None:
    _, accounts, clock = world
    (code,) = await accounts.create_licences(1, days=182)
    acct, keys = device()
    nonce = b"n" * 32
    account = await register(accounts, code, acct, keys, nonce, login(acct, nonce))
    assert account.expires_at == int(clock.now) + 182 * DAY
    clock.now += 181 * DAY
    await accounts.authenticate(keys.ed25519, nonce, login(acct, nonce))
    clock.now += 2 * DAY
    # Past its end the account still logs in (it receives what was queued); sending is refused.
    expired = await accounts.authenticate(keys.ed25519, nonce, login(acct, nonce))
    with pytest.raises(AccountExpired, match="subscription ended on"):
        Subscriptions(world[0], clock).check_send(expired)


async def test_challenge_signature_is_bound_to_the_nonce(
    world: tuple[SqliteStore, Accounts, Clock],
) -> None:
    _, accounts, _ = world
    (code,) = await accounts.create_licences(1, days=1)
    acct, keys = device()
    old = login(acct, b"old" * 11)
    with pytest.raises(BadSignature):  # a recorded login cannot be replayed on a new challenge
        await register(accounts, code, acct, keys, b"new" * 11, old)
    elsewhere = acct.sign(signing.challenge_message(b"new" * 11, acct.ed25519, "http://evil:80"))
    with pytest.raises(BadSignature):  # nor relayed from another server (origin-bound)
        await register(accounts, code, acct, keys, b"new" * 11, elsewhere)
    # and the refused attempts did not use up the licence
    await register(accounts, code, acct, keys, b"new" * 11, login(acct, b"new" * 11))
    with pytest.raises(LicenceInvalid):
        acct2, keys2 = device()
        await register(accounts, code, acct2, keys2, b"x" * 32, login(acct2, b"x" * 32))


async def test_licence_codes_normalise(world: tuple[SqliteStore, Accounts, Clock]) -> None:
    _, accounts, _ = world
    (code,) = await accounts.create_licences(1, days=1)
    assert licence_hash(code) == licence_hash(" " + code.lower().replace("-", " ") + " ")
    assert normalise_licence(code) == code.replace("-", "")


async def test_undelivered_envelopes_and_links_expire(
    world: tuple[SqliteStore, Accounts, Clock],
) -> None:
    store, accounts, clock = world
    now = int(clock.now)
    await store.insert_envelopes([("dev", now + 30 * DAY, b"a"), ("dev", now + 1, b"b")])
    acct, keys = device()
    nonce = b"n" * 32
    token, _ = await accounts.request_link(PendingLink(device=keys), nonce, login(acct, nonce))
    assert await accounts.link_keys(token) == keys
    clock.now += 601
    with pytest.raises(LinkInvalid):
        await accounts.link_keys(token)
    assert await store.sweep(int(clock.now)) == (1, 1)
    assert [b for _, b in await store.envelopes_after("dev", 0, int(clock.now), 10)] == [b"a"]
    clock.now += 30 * DAY
    assert (
        await store.envelopes_after("dev", 0, int(clock.now), 10) == []
    )  # never handed out expired
    assert await store.sweep(int(clock.now)) == (1, 0)


def test_token_bucket() -> None:
    clock = Clock()
    bucket = TokenBucket(rate_per_s=2, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5
    assert bucket.take() and not bucket.take()
    clock.now += 100
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]  # capped at the burst


def test_limits_are_configurable_by_name() -> None:
    from kluis.server.config import limits_with_overrides

    limits = limits_with_overrides(Limits(), ["claim_rate_per_s=5", "mailbox-quota=7"])
    assert limits.claim_rate_per_s == 5.0 and limits.mailbox_quota == 7
    for bad in (
        ["no_such_limit=1"],
        ["mailbox_quota=lots"],
        ["mailbox_quota=-1"],
        ["mailbox_quota"],
    ):
        with pytest.raises(ValueError):
            limits_with_overrides(Limits(), bad)


async def test_full_mailbox_has_room_again_after_expiry(tmp_path: Path) -> None:
    from kluis.errors import QuotaExceeded
    from kluis.server.mailbox import Mailbox

    clock = Clock()
    store = SqliteStore(tmp_path / "db.sqlite3")
    mailbox = Mailbox(store, Limits(mailbox_quota=2, envelope_ttl_s=60), clock, InProcessBus())
    await mailbox.deposit([("dev", b"1")])
    await mailbox.deposit([("dev", b"2")])
    with pytest.raises(QuotaExceeded):
        await mailbox.deposit([("dev", b"3")])
    clock.now += 61 + 3600  # the expiry is rounded up to a whole hour
    assert await mailbox.sweep() == 2  # what the server's sweeper does
    await mailbox.deposit([("dev", b"3")])
    assert [b for _, b in await store.envelopes_after("dev", 0, int(clock.now), 10)] == [b"3"]
    await store.close()


async def test_stored_envelopes_carry_no_deposit_order_across_devices(tmp_path: Path) -> None:
    from kluis.server.mailbox import Mailbox

    clock = Clock()
    store = SqliteStore(tmp_path / "db.sqlite3", seq_origin=lambda: 0)
    mailbox = Mailbox(store, Limits(), clock, InProcessBus())
    for i in range(20):  # a recipient's envelope, then the sender's copy for another device
        assert await mailbox.deposit(
            [("recipient", b"r%d" % i), ("senders-other", b"s%d" % i)]
        ) == [
            i + 1,
            i + 1,
        ]  # wire ids count per device: delivery order is kept
    db = store.db._db
    assert "id" not in {r[1] for r in db.execute("PRAGMA table_info(envelopes)")}
    rows = db.execute("SELECT device_id, seq, expires_at FROM envelopes").fetchall()  # disk order
    order = [device for device, _, _ in rows]
    assert order == ["recipient"] * 20 + ["senders-other"] * 20  # by device, not by arrival
    assert {e for _, _, e in rows} == {
        -(-(int(clock.now) + Limits().envelope_ttl_s) // 3600) * 3600
    }
    assert all(e % 3600 == 0 for _, _, e in rows)  # expiry in whole hours: deposits are not dated
    assert [b for _, b in await store.envelopes_after("recipient", 0, int(clock.now), 100)] == [
        b"r%d" % i for i in range(20)
    ]
    assert await store.delete_envelopes([("recipient", 1), ("senders-other", 1)]) == 2
    assert await store.envelopes_after("recipient", 0, int(clock.now), 1) == [(2, b"r1")]
    await store.close()


async def test_device_list_read_across_a_change_does_not_fill_the_cache(
    world: tuple[SqliteStore, Accounts, Clock],
) -> None:
    """A send's device list, read while a device is added or revoked, is not cached: the next
    send reads the list again (a stale cache could skip a new device or address a revoked one)."""
    store, accounts, _ = world
    (code,) = await accounts.create_licences(1, days=182)
    acct, keys = device()
    nonce = b"n" * 32
    account = await register(accounts, code, acct, keys, nonce, login(acct, nonce))
    assert await accounts.device_ids(account.id) == {keys.ed25519}
    assert accounts.cached_device_ids(account.id) == frozenset({keys.ed25519})

    gate = asyncio.Event()
    real = store.active_devices

    async def slow_active_devices(account_id: str) -> list[DeviceRecord]:
        devices = await real(account_id)  # read before the change ...
        await gate.wait()  # ... and returned after it
        return devices

    store.active_devices = slow_active_devices  # type: ignore[method-assign]
    accounts._devices_changing(account.id)  # what approve_link and revoke do
    read = asyncio.ensure_future(accounts.device_ids(account.id))
    await asyncio.sleep(0.01)
    accounts._devices_changing(account.id)  # the change's store call is done
    gate.set()
    assert await read == {keys.ed25519}
    assert accounts.cached_device_ids(account.id) is None  # not filled from the old read
    store.active_devices = real  # type: ignore[method-assign]
    assert await accounts.device_ids(account.id) == {keys.ed25519}
    assert accounts.cached_device_ids(account.id) == frozenset({keys.ed25519})
