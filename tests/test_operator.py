"""The operator's side (issue 11), in process: subscriptions with injected time, signed
announcements, remote wipe, the panic passphrase."""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kluis.audit.storage import profile_secrets
from kluis.client.client import KluisClient
from kluis.client.wipe import set_panic
from kluis.crypto.account_key import AccountKey
from kluis.errors import (
    AccountExpired,
    AccountSuspended,
    BadSignature,
    DeviceWiped,
    LicenceInvalid,
    LocalProtocolError,
    ReplayError,
    UnknownDevice,
)
from kluis.protocol import operator as op
from kluis.server.config import DAY, Limits, ServerConfig
from kluis.server.inprocess import InProcessServer, open_inprocess_server
from kluis.server.operator import announcements, keyfile
from kluis.server.operator.wipe import sign_order
from tests.kluis_testing import (
    PASSPHRASE,
    fast_kdf,
    link_device,
    reconnect,
    transport_factory,
)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def op_server(tmp_path: Path, clock: Clock) -> AsyncIterator[InProcessServer]:
    """An in-process server whose clock the test moves, with an operator key made by
    ``kluis admin init`` before it starts (kept at tmp_path/server/operator.key)."""
    data = tmp_path / "server"
    config = ServerConfig(data_dir=data, limits=Limits())
    keyfile.init(data, config.origin)
    srv = await open_inprocess_server(config, clock)
    try:
        yield srv
    finally:
        await srv.close()


async def _code(server: InProcessServer, days: int = 182) -> str:
    subs = server.server.services.subscriptions
    assert subs is not None
    (lic,) = await subs.create(1, f"{days}-days", days)
    return lic.code


async def _register(server: InProcessServer, profile: Path, days: int = 182) -> KluisClient:
    return await KluisClient.register(
        server.url,
        await _code(server, days),
        profile,
        PASSPHRASE,
        transport_factory=transport_factory(server),
        kdf=fast_kdf(),
    )


def _operator_key(server: InProcessServer) -> AccountKey:
    key, _ = keyfile.load_key(server.config.data_dir)
    return key


# ---- subscriptions --------------------------------------------------------------------------


async def test_expired_account_cannot_send_and_renewal_restores_it(
    op_server: InProcessServer, clock: Clock, tmp_path: Path
) -> None:
    alice = await _register(op_server, tmp_path / "alice", days=182)
    bob = await _register(op_server, tmp_path / "bob", days=365)
    await alice.send(bob.account_id, "before the end")
    await alice.close()

    clock.now += 183 * DAY  # time injected, not waited for
    alice = await reconnect(op_server, tmp_path / "alice")  # an expired account still logs in
    end = alice.subscription_end
    assert end is not None and end < clock.now
    with pytest.raises(AccountExpired, match=r"subscription ended on \d{4}-\d\d-\d\d; renew"):
        await alice.send(bob.account_id, "after the end")
    # ... but it still receives what is queued for it
    assert [m.text for m in await bob.receive(wait=0.5, until=1)] == ["before the end"]
    await bob.send(alice.account_id, "are you there?")
    assert [m.text for m in await alice.receive(wait=0.5, until=1)] == ["are you there?"]

    new_end = await alice.renew(await _code(op_server, 182))
    assert new_end == int(clock.now) + 182 * DAY  # from now: the old end had passed
    assert alice.subscription_end == new_end
    await alice.send(bob.account_id, "renewed")
    assert [m.text for m in await bob.receive(wait=0.5, until=1)] == ["renewed"]
    with pytest.raises(LicenceInvalid):  # a code is single use
        await alice.renew("AAAA-BBBB")
    await alice.close()
    await bob.close()


async def test_renewal_adds_to_the_current_end(
    op_server: InProcessServer, clock: Clock, tmp_path: Path
) -> None:
    alice = await _register(op_server, tmp_path / "alice", days=182)
    first_end = alice.subscription_end
    assert first_end is not None and alice.renewal_notice() == ""
    clock.now += 100 * DAY
    assert await alice.renew(await _code(op_server, 31)) == first_end + 31 * DAY
    await alice.close()


async def test_renewal_notice_from_14_days_before_the_end(
    op_server: InProcessServer, clock: Clock, tmp_path: Path
) -> None:
    alice = await _register(op_server, tmp_path / "alice", days=10)
    assert alice.renewal_notice().startswith("notice: your subscription ends on ")
    await alice.close()


async def test_suspended_account_cannot_log_in_until_reinstated(
    op_server: InProcessServer, tmp_path: Path
) -> None:
    alice = await _register(op_server, tmp_path / "alice")
    account = alice.account_id
    await alice.close()
    subs = op_server.server.services.subscriptions
    assert subs is not None
    await subs.set_suspended(account, True)
    with pytest.raises(AccountSuspended):
        await reconnect(op_server, tmp_path / "alice")
    await subs.set_suspended(account, False)
    alice = await reconnect(op_server, tmp_path / "alice")
    await alice.close()


# ---- signed announcements -------------------------------------------------------------------


async def _queue(server: InProcessServer, envelope: bytes) -> int:
    services = server.server.services
    return await announcements.queue_announcement(server.server.store, services.mailbox, envelope)


async def test_announcement_reaches_every_device_as_operator(
    op_server: InProcessServer, tmp_path: Path
) -> None:
    alice = await _register(op_server, tmp_path / "alice")
    bob = await _register(op_server, tmp_path / "bob")
    envelope = announcements.sign_announcement(
        _operator_key(op_server), op_server.origin, "maintenance tonight", int(time.time())
    )
    assert await _queue(op_server, envelope) == 2
    for client in (alice, bob):
        (m,) = await client.receive(wait=0.5, until=1)
        assert (m.sender, m.conversation, m.text) == ("operator", "operator", "maintenance tonight")
        await client.close()


async def test_forged_or_replayed_announcements_are_refused(
    op_server: InProcessServer, tmp_path: Path
) -> None:
    alice = await _register(op_server, tmp_path / "alice")
    now = int(time.time())
    real_key = _operator_key(op_server)
    genuine = announcements.sign_announcement(real_key, op_server.origin, "genuine", now)
    forged = announcements.sign_announcement(AccountKey(), op_server.origin, "forged", now)
    other_server = announcements.sign_announcement(
        real_key, "https://other.example:443", "from elsewhere", now
    )
    # Written straight into the database, as a thief with the disk (or the server) could.
    ttl = now + 30 * DAY
    rows = [(alice.core.device_id, ttl, body) for body in (forged, other_server, genuine)]
    await op_server.server.store.write_envelopes(rows, [])
    await alice.close()  # unannounced on the bus: read at the next login
    alice = await reconnect(op_server, tmp_path / "alice")
    shown = await alice.receive(wait=0.5)
    assert [m.text for m in shown] == ["genuine"]
    assert [type(e) for e in alice.errors] == [BadSignature, BadSignature]
    assert "another server" in str(alice.errors[1])
    # The genuine one replayed (a server keeping a copy and delivering it again): refused.
    await op_server.server.store.write_envelopes([(alice.core.device_id, ttl, genuine)], [])
    await alice.close()
    alice = await reconnect(op_server, tmp_path / "alice")
    assert await alice.receive(wait=0.5) == []
    assert [type(e) for e in alice.errors] == [ReplayError]
    assert alice.quarantined == 3
    await alice.close()


# ---- remote wipe ----------------------------------------------------------------------------


def _empty(folder: Path) -> bool:
    return folder.is_dir() and not any(folder.rglob("*"))


async def test_owner_wipes_a_device_which_erases_itself_and_never_reconnects(
    op_server: InProcessServer, tmp_path: Path
) -> None:
    alice = await _register(op_server, tmp_path / "alice")
    laptop = await link_device(alice, op_server, tmp_path / "laptop")
    device = laptop.core.device_id
    await laptop.close()
    stolen = tmp_path / "stolen-copy"  # a thief copied the disk before the wipe
    shutil.copytree(tmp_path / "laptop", stolen)

    await alice.wipe_device(device)
    with pytest.raises(DeviceWiped):
        await reconnect(op_server, tmp_path / "laptop")
    assert _empty(tmp_path / "laptop")
    stored = await op_server.server.store.device(device)
    assert stored is not None and stored.revoked
    with pytest.raises(UnknownDevice):  # the copy never authenticates again
        await reconnect(op_server, stolen)
    await alice.refresh_devices(alice.account_id)
    assert device not in {r.keys.ed25519 for r in await alice.devices()}
    await alice.close()


async def test_operator_wipe_follows_the_account_policy(
    op_server: InProcessServer, tmp_path: Path
) -> None:
    alice = await _register(op_server, tmp_path / "alice")
    device, account = alice.core.device_id, alice.account_id
    await alice.close()
    wipes, subs = op_server.server.services.wipes, op_server.server.services.subscriptions
    assert wipes is not None and subs is not None
    order = op.WipeOrder(
        account=account, device=device, server=op_server.origin, issued_at=1, by="operator"
    )
    signed = op.encode_wipe(sign_order(_operator_key(op_server), order))
    await subs.set_operator_wipe(account, False)
    with pytest.raises(LocalProtocolError, match="policy"):
        await wipes.order(signed)
    with pytest.raises(BadSignature):  # the server refuses an order under another key
        await wipes.order(op.encode_wipe(sign_order(AccountKey(), order)))
    await subs.set_operator_wipe(account, True)
    await wipes.order(signed)
    with pytest.raises(DeviceWiped):
        await reconnect(op_server, tmp_path / "alice")
    assert _empty(tmp_path / "alice")


async def test_forged_wipe_order_in_the_database_is_refused_by_the_device(
    op_server: InProcessServer, tmp_path: Path
) -> None:
    alice = await _register(op_server, tmp_path / "alice")
    device, account = alice.core.device_id, alice.account_id
    await alice.close()
    order = op.WipeOrder(
        account=account, device=device, server=op_server.origin, issued_at=1, by="operator"
    )
    forged = op.encode_wipe(sign_order(AccountKey(), order))
    await op_server.server.store.put_wipe(device, forged)  # a hostile server, or a thief
    with pytest.raises(BadSignature):
        await reconnect(op_server, tmp_path / "alice")
    alice = KluisClient.open(tmp_path / "alice", PASSPHRASE)  # nothing was erased
    assert alice.account_id == account
    alice.core.store.close()


# ---- local wipe and the panic passphrase ----------------------------------------------------


async def test_panic_passphrase_erases_the_profile_like_an_empty_start(
    op_server: InProcessServer, tmp_path: Path
) -> None:
    alice = await _register(op_server, tmp_path / "alice")
    await alice.close()
    set_panic(tmp_path / "alice", "duress words")
    alice = KluisClient.open(tmp_path / "alice", PASSPHRASE)  # the real one still opens
    alice.core.store.close()
    with pytest.raises(LocalProtocolError) as panic:
        KluisClient.open(tmp_path / "alice", "duress words")
    with pytest.raises(LocalProtocolError) as missing:
        KluisClient.open(tmp_path / "nobody", "duress words")
    assert str(panic.value) == str(missing.value).replace("nobody", "alice")
    assert _empty(tmp_path / "alice")
    assert profile_secrets(tmp_path / "alice", PASSPHRASE) == []
