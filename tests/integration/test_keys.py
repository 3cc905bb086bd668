"""Key directory, pinning and session recovery, over a real server."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from kluis.errors import DecryptionError, KeyChanged, LocalProtocolError
from kluis.protocol import frames as f
from tests.kluis_testing import ServerProcess, register


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """Claims here walk through all of a device's keys: the per-target budget (tested in
    test_review_findings_server.py) must not hand out the fallback key first."""
    srv = ServerProcess(tmp_path / "server", "--limit", "claim_target_burst=1000")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


async def claim(client, account: str, device: str) -> f.Bundle:  # type: ignore[no-untyped-def]
    answer = await client.transport.request(
        lambda rid: f.ClaimKeys(rid=rid, account=account, devices=[device]), f.Bundles
    )
    (bundle,) = answer.bundles
    return bundle


async def test_claims_hand_out_each_key_once_then_fallback_and_refill(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    bob_device = bob.core.device_id
    await bob.close()  # offline: nobody refills
    seen: set[str] = set()
    fallback_keys: set[str] = set()
    for _ in range(40):
        bundle = await claim(alice, bob.account_id, bob_device)
        if bundle.fallback:
            fallback_keys.add(bundle.one_time_key.key)
            break
        assert bundle.one_time_key.key not in seen, "a one-time key was handed out twice"
        seen.add(bundle.one_time_key.key)
    assert len(seen) >= 20 and fallback_keys  # every uploaded key once, then the fallback
    for _ in range(3):  # none left: the fallback key, every time
        fallback_keys.add((await claim(alice, bob.account_id, bob_device)).one_time_key.key)
    assert len(fallback_keys) == 1

    # Bob comes back, learns his count is low and replenishes.
    from kluis.client.client import KluisClient
    from tests.kluis_testing import PASSPHRASE

    bob = KluisClient.open(tmp_path / "bob", PASSPHRASE)
    await bob.connect()
    bundle = await claim(alice, bob.account_id, bob_device)
    assert not bundle.fallback and bundle.one_time_key.key not in seen
    # The claim rate is limited: a hostile client cannot drain keys without bound.
    with pytest.raises(Exception) as info:
        for _ in range(100):
            await claim(alice, bob.account_id, bob_device)
    assert getattr(info.value, "code", "") == "rate_limited"
    await alice.close()
    await bob.close()


async def test_swapped_device_keys_stop_sending_until_acknowledged(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    mallory = await register(server, tmp_path / "mallory")
    await alice.send(bob.account_id, "pinned now")
    assert [m.text for m in await bob.receive(wait=5, until=1)] == ["pinned now"]
    # Out of band, Alice and Bob compare safety numbers: the same keys on both sides.
    bobs_own = await bob.safety_number()
    assert await alice.safety_number(bob.account_id) == bobs_own

    # A malicious server moves Mallory's device into Bob's account and hides Bob's real one.
    server.stop()
    db = sqlite3.connect(server.data / "kluis.sqlite3")
    db.execute(
        "UPDATE devices SET account_id = ? WHERE id = ?", (bob.account_id, mallory.core.device_id)
    )
    db.execute("UPDATE devices SET revoked = 1 WHERE id = ?", (bob.core.device_id,))
    db.commit()
    db.close()
    server.start()
    for c in (alice, bob, mallory):
        await c.close()
    from kluis.client.client import KluisClient
    from tests.kluis_testing import PASSPHRASE

    alice = KluisClient.open(tmp_path / "alice", PASSPHRASE)
    await alice.connect()
    with pytest.raises(KeyChanged):
        await alice.send(bob.account_id, "must not reach mallory")
    with pytest.raises(KeyChanged):  # still refused: nothing is used silently
        await alice.send(bob.account_id, "must not reach mallory either")
    assert [m.text for m in alice.history(bob.account_id)] == ["pinned now"]
    # Before trusting, the safety number of the changed keys shows the swap.
    assert await alice.safety_number(bob.account_id) != bobs_own

    alice.acknowledge_key_change(bob.account_id)  # the user accepts the new keys
    # ...and a comparison of safety numbers would now show the swap.
    assert await alice.safety_number(bob.account_id) != bobs_own
    await alice.send(bob.account_id, "after acknowledging")
    await alice.close()
    # Acknowledged, so it went to the device now listed for Bob.
    db = sqlite3.connect(server.data / "kluis.sqlite3")
    stored = db.execute("SELECT device_id FROM envelopes").fetchall()
    db.close()
    assert stored == [(mallory.core.device_id,)]
    # Mallory's own client notices that the server moved it to another account, and refuses.
    mallory = KluisClient.open(tmp_path / "mallory", PASSPHRASE)
    with pytest.raises(LocalProtocolError):
        await mallory.connect()
    await mallory.close()


async def test_broken_session_recovers(server: ServerProcess, tmp_path: Path) -> None:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    await alice.send(bob.account_id, "one")
    await bob.receive(wait=5, until=1)
    await bob.send(alice.account_id, "two")
    await alice.receive(wait=5, until=1)

    # Bob loses his session with Alice (e.g. a profile restored from an old copy).
    alice_curve = alice.core.device_keys().curve25519
    bob.core.store.drop_sessions(alice_curve)
    await alice.send(bob.account_id, "three: lost")
    assert await bob.receive(wait=5, until=1) == []
    assert isinstance(bob.errors[-1], DecryptionError)
    # Bob opened a fresh session and told Alice's device with a message she does not show.
    assert await alice.receive(wait=2) == []
    await alice.send(bob.account_id, "four: recovered")
    assert [m.text for m in await bob.receive(wait=5, until=1)] == ["four: recovered"]
    await bob.send(alice.account_id, "five")
    assert [m.text for m in await alice.receive(wait=5, until=1)] == ["five"]
    await alice.close()
    await bob.close()
