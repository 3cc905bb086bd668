"""Key directory and session recovery, over a server application joined in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kluis.client.client import KluisClient
from kluis.client.core import RECOVERY_DELAY_MS
from kluis.errors import DecryptionError, RateLimited
from kluis.protocol import frames as f
from kluis.server.config import Limits
from kluis.server.inprocess import InProcessServer
from tests.kluis_testing import reconnect, register, start_inprocess


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[InProcessServer]:
    """Claims here walk through all of a device's keys: the per-target budget (tested in
    test_review_findings_server.py) must not hand out the fallback key first."""
    srv = await start_inprocess(tmp_path / "server", Limits(claim_target_burst=1000))
    try:
        yield srv
    finally:
        await srv.close()


async def claim(client: KluisClient, account: str, device: str) -> f.Bundle:
    answer = await client.transport.request(
        lambda rid: f.ClaimKeys(rid=rid, account=account, devices=[device]), f.Bundles
    )
    (bundle,) = answer.bundles
    return bundle


async def test_claims_hand_out_each_key_once_then_fallback_and_refill(
    server: InProcessServer, tmp_path: Path
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
    bob = await reconnect(server, tmp_path / "bob")
    bundle = await claim(alice, bob.account_id, bob_device)
    assert not bundle.fallback and bundle.one_time_key.key not in seen
    # The claim rate is limited: a hostile client cannot drain keys without bound.
    with pytest.raises(RateLimited):
        for _ in range(Limits().claim_burst + 100):
            await claim(alice, bob.account_id, bob_device)
    await alice.close()
    await bob.close()


async def test_broken_session_recovers(server: InProcessServer, tmp_path: Path) -> None:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    await alice.send(bob.account_id, "one")
    await bob.receive(wait=5, until=1)
    await bob.send(alice.account_id, "two")
    await alice.receive(wait=5, until=1)
    assert await bob.receive(wait=1) == []  # Alice's delivered receipt, before the loss

    # Bob loses his session with Alice (e.g. a profile restored from an old copy).
    bob.core.store.drop_sessions(f"{alice.account_id}/{alice.core.device_id}")
    await alice.send(bob.account_id, "three: lost")
    shown = []
    for _ in range(50):  # until Bob has read the envelope (nothing shown), at most 5 s
        shown += await bob.receive(wait=0.1)
        if bob.quarantined:
            break
    assert shown == []
    assert isinstance(bob.errors[-1], DecryptionError)
    assert bob.quarantined == 1  # kept aside, acknowledged, never retried by itself
    # No answer at once (a forged claim must not make Bob talk to anyone)...
    assert await alice.receive(wait=1) == []
    # ...but once the delay has passed, Bob opens a fresh session with a message Alice ignores.
    real_clock = bob.core._clock
    bob.core._clock = lambda: real_clock() + RECOVERY_DELAY_MS / 1000 + 1
    assert await bob.receive(wait=0.5) == []
    assert await alice.receive(wait=2) == []  # the dummy: not shown
    await alice.send(bob.account_id, "four: recovered")
    assert [m.text for m in await bob.receive(wait=5, until=1)] == ["four: recovered"]
    await bob.send(alice.account_id, "five")
    assert [m.text for m in await alice.receive(wait=5, until=1)] == ["five"]
    await alice.close()
    await bob.close()
