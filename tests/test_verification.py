"""SAS verification: two devices over the in-memory server, and the flow's rules in the core."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kluis.client.client import KluisClient
from kluis.client.core import ClientCore
from kluis.client.sas_emoji import EMOJI
from kluis.client.verification import TIMEOUT_MS, State, Status, Verification
from kluis.crypto.account_key import AccountKey
from kluis.crypto.sas import SasKeys
from kluis.errors import LocalProtocolError, VerificationBroken, VerificationFailed
from kluis.protocol.payload import (
    Payload,
    VerifyCancel,
    VerifyDone,
    VerifyKey,
    VerifyMac,
    VerifyRequest,
)
from kluis.server.inprocess import InProcessServer
from tests.kluis_testing import link_device, register
from tests.test_core import bundle, connect, deliver, make_core


def confirming(answer: bool, seen: list[Verification]):  # type: ignore[no-untyped-def]
    async def confirm(flow: Verification) -> bool:
        seen.append(flow)
        return answer

    return confirm


async def both_verify(
    a: KluisClient, b: KluisClient, answer_a: bool = True, answer_b: bool = True
) -> tuple[list[object], list[Verification], list[Verification]]:
    seen_a: list[Verification] = []
    seen_b: list[Verification] = []
    results = await asyncio.gather(
        a.verify(b.account_id, confirming(answer_a, seen_a), timeout=20),
        b.verify(a.account_id, confirming(answer_b, seen_b), timeout=20),
        return_exceptions=True,
    )
    return list(results), seen_a, seen_b


async def test_sas_succeeds_when_both_confirm(inproc: InProcessServer, tmp_path: Path) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    results, seen_a, seen_b = await both_verify(alice, bob)
    assert all(isinstance(r, Verification) and r.state is State.VERIFIED for r in results), results
    (code_a,), (code_b,) = [s.short_code for s in seen_a], [s.short_code for s in seen_b]
    assert code_a is not None and code_a == code_b
    assert len(code_a.emoji) == 7 and len(code_a.decimals) == 3
    assert alice.verification_status(bob.account_id) == (Status.VERIFIED, "")
    assert bob.verification_status(alice.account_id) == (Status.VERIFIED, "")
    await alice.send(bob.account_id, "verified hello")
    assert [m.text for m in await bob.receive(wait=5, until=1)] == ["verified hello"]
    for c in (alice, bob):
        await c.close()


async def test_sas_fails_when_one_side_declines(inproc: InProcessServer, tmp_path: Path) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    results, _, seen_b = await both_verify(alice, bob, answer_b=False)
    assert all(isinstance(r, VerificationFailed) for r in results), results
    assert "differ" in str(results[1])  # Bob said no ...
    assert "cancelled (mismatch)" in str(results[0])  # ... and Alice's side was told
    assert len(seen_b) == 1  # Bob saw the code (Alice may get the cancel before she asks)
    assert alice.verification_status(bob.account_id) == (Status.UNVERIFIED, "")
    assert bob.verification_status(alice.account_id) == (Status.UNVERIFIED, "")
    await alice.send(bob.account_id, "unverified peers may still write")
    for c in (alice, bob):
        await c.close()


async def test_key_change_after_verification_blocks_sending_until_reverified(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    alice = await register(inproc, tmp_path / "alice")
    bob = await register(inproc, tmp_path / "bob")
    bob2 = await link_device(bob, inproc, tmp_path / "bob2")
    # Alice verifies Bob on his second device (his first device is not running `verify`).
    results, _, _ = await both_verify(alice, bob2)
    assert all(isinstance(r, Verification) for r in results), results
    first = results[0]
    assert isinstance(first, Verification) and first.peer_device == bob2.core.device_id
    await alice.send(bob.account_id, "to both of bob's devices")

    # Bob revokes the device Alice verified: a key change Alice must not accept silently.
    await bob.revoke(bob2.core.device_id)
    await bob2.close()
    with pytest.raises(VerificationBroken) as err:
        await alice.send(bob.account_id, "blocked")
    assert err.value.details["account"] == bob.account_id
    status, reason = alice.verification_status(bob.account_id)
    assert status is Status.BROKEN and "revoked" in reason
    with pytest.raises(VerificationBroken):  # still, on a fresh device list
        await alice.refresh_devices(bob.account_id)
        await alice.send(bob.account_id, "blocked again")

    # A fresh SAS with Bob's remaining device lifts the block.
    results, _, _ = await both_verify(alice, bob)
    assert all(isinstance(r, Verification) for r in results), results
    assert alice.verification_status(bob.account_id) == (Status.VERIFIED, "")
    await alice.send(bob.account_id, "after re-verifying")
    got = [m.text for m in bob.history(alice.account_id)]
    assert "after re-verifying" not in got  # not received yet
    assert "after re-verifying" in [m.text for m in await bob.receive(wait=5, until=1)]
    assert "blocked" not in [m.text for m in bob.history(alice.account_id)]
    for c in (alice, bob):
        await c.close()


# ---- the flow's rules, core to core (no server): tampering, refusals, time --------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


Tamper = Callable[[Payload], Payload | None]


@pytest.fixture
def cores(tmp_path: Path) -> tuple[ClientCore, ClientCore, Clock]:
    clock = Clock()
    alice = make_core(tmp_path, "alice", clock=clock)
    bob = make_core(tmp_path, "bob", clock=clock)
    connect(alice, bob)
    bob.add_bundles(alice.account_id, [bundle(alice)])
    return alice, bob, clock


def pump(src: ClientCore, dst: ClientCore, tamper: Tamper | None = None) -> list[Payload]:
    """Deliver what ``src``'s flows queued to ``dst``, through Olm and sealing."""
    sent = []
    for account, payload in src.verification.take_outbox():
        assert account == dst.account_id
        changed = tamper(payload) if tamper is not None else payload
        if changed is None:
            continue
        for env in src.encrypt(account, changed):
            deliver(dst, env)
        sent.append(changed)
    return sent


def settle(
    a: ClientCore, b: ClientCore, ab: Tamper | None = None, ba: Tamper | None = None
) -> None:
    while pump(a, b, ab) + pump(b, a, ba):
        pass


def to_comparing(
    alice: ClientCore, bob: ClientCore, ab: Tamper | None = None, ba: Tamper | None = None
) -> tuple[Verification, Verification]:
    """Alice asks, Bob answers (as `kluis verify` on both sides would), keys are exchanged."""
    alice.verification.begin(bob.account_id)
    settle(alice, bob, ab, ba)  # Bob keeps the request until his user runs `verify`
    bob.verification.begin(alice.account_id)
    settle(alice, bob, ab, ba)
    va, vb = alice.verification.current(bob.account_id), bob.verification.current(alice.account_id)
    assert va is not None and vb is not None
    return va, vb


def states(alice: ClientCore, bob: ClientCore) -> tuple[State | None, State | None]:
    va, vb = alice.verification.current(bob.account_id), bob.verification.current(alice.account_id)
    return (va.state if va else None, vb.state if vb else None)


def unverified(alice: ClientCore, bob: ClientCore) -> bool:
    return (
        alice.verification.status(bob.account_id)[0] is Status.UNVERIFIED
        and bob.verification.status(alice.account_id)[0] is Status.UNVERIFIED
    )


def test_core_flow_verifies_identity_and_device(
    cores: tuple[ClientCore, ClientCore, Clock],
) -> None:
    alice, bob, _ = cores
    va, vb = to_comparing(alice, bob)
    assert va.state is vb.state is State.COMPARING and va.short_code == vb.short_code
    alice.verification.confirm(va.txn, True)
    bob.verification.confirm(vb.txn, True)
    settle(alice, bob)
    assert states(alice, bob) == (State.VERIFIED, State.VERIFIED)
    record = alice.verification.record(bob.account_id)
    assert record is not None and record.identity == bob.identity_key
    assert record.devices == {bob.device_id: bob.device_keys().curve25519}


def test_a_key_swapped_after_the_commitment_is_refused(
    cores: tuple[ClientCore, ClientCore, Clock],
) -> None:
    """A man in the middle replaces Bob's SAS key: it no longer matches Bob's commitment."""
    alice, bob, _ = cores

    def swap(p: Payload) -> Payload:
        return (
            msgspec.structs.replace(p, key=SasKeys().public_key) if isinstance(p, VerifyKey) else p
        )

    va, vb = to_comparing(alice, bob, ba=swap)
    assert va.state is State.CANCELLED and "commitment" in va.reason
    assert vb.state is State.CANCELLED and "cancelled (commitment)" in vb.reason
    assert va.short_code is None  # Alice never showed a code
    assert unverified(alice, bob)


def test_a_key_swapped_before_the_commitment_gives_different_codes(
    cores: tuple[ClientCore, ClientCore, Clock],
) -> None:
    """Alice's SAS key replaced on its way: the codes differ; if the users said yes all the
    same, the MACs would not verify."""
    alice, bob, _ = cores

    def swap(p: Payload) -> Payload:
        return (
            msgspec.structs.replace(p, key=SasKeys().public_key) if isinstance(p, VerifyKey) else p
        )

    va, vb = to_comparing(alice, bob, ab=swap)
    assert va.state is vb.state is State.COMPARING
    assert va.short_code != vb.short_code  # what the users see, and refuse
    alice.verification.confirm(va.txn, True)  # careless users
    bob.verification.confirm(vb.txn, True)
    settle(alice, bob)
    assert states(alice, bob) == (State.CANCELLED, State.CANCELLED)
    assert unverified(alice, bob)


def test_a_tampered_mac_is_refused(cores: tuple[ClientCore, ClientCore, Clock]) -> None:
    alice, bob, _ = cores

    def tamper(p: Payload) -> Payload:  # Bob's identity MAC made over another key
        if isinstance(p, VerifyMac):
            return msgspec.structs.replace(p, identity_mac=p.device_mac)
        return p

    va, vb = to_comparing(alice, bob)
    bob.verification.confirm(vb.txn, True)
    pump(bob, alice, tamper)  # arrives early: kept until Alice's user confirms
    alice.verification.confirm(va.txn, True)
    settle(alice, bob)
    va2 = alice.verification.current(bob.account_id)
    assert va2 is not None and va2.state is State.CANCELLED and "MAC" in va2.reason
    assert states(alice, bob) == (State.CANCELLED, State.CANCELLED)
    assert unverified(alice, bob)


def test_one_side_declining_cancels_both(cores: tuple[ClientCore, ClientCore, Clock]) -> None:
    alice, bob, _ = cores
    va, vb = to_comparing(alice, bob)
    alice.verification.confirm(va.txn, True)
    bob.verification.confirm(vb.txn, False)
    settle(alice, bob)
    assert states(alice, bob) == (State.CANCELLED, State.CANCELLED)
    assert unverified(alice, bob)
    with pytest.raises(LocalProtocolError):  # no second answer
        bob.verification.confirm(vb.txn, True)


def _from(sender: ClientCore, receiver: ClientCore, payload: Payload) -> None:
    for env in sender.encrypt(receiver.account_id, payload):
        deliver(receiver, env)


def test_unknown_duplicate_and_out_of_order_messages_change_nothing(
    cores: tuple[ClientCore, ClientCore, Clock],
) -> None:
    alice, bob, _ = cores
    stamp: dict[str, Any] = {"ts": 1, "to": alice.account_id, "for_device": alice.device_id}
    # A message of a verification Alice never started.
    _from(bob, alice, VerifyKey(id=secrets.token_bytes(16), txn=b"x" * 16, key="k", **stamp))
    assert alice.verification.ignored[-1] == "unknown verification"

    alice.verification.begin(bob.account_id)
    settle(alice, bob)
    (va,) = [alice.verification.current(bob.account_id)]
    assert va is not None
    stamp["txn"] = va.txn
    # Out of order: a MAC or a done before any key.
    _from(bob, alice, VerifyMac(id=secrets.token_bytes(16), identity_mac="a", **stamp))
    _from(bob, alice, VerifyDone(id=secrets.token_bytes(16), **stamp))
    assert states(alice, bob)[0] is State.REQUESTED
    assert alice.verification.take_outbox() == []

    bob.verification.begin(alice.account_id)
    settle(alice, bob)
    before = alice.verification.current(bob.account_id)
    assert before is not None and before.state is State.COMPARING
    # A second key in the same flow, and the same envelope delivered twice.
    key = VerifyKey(id=secrets.token_bytes(16), key=SasKeys().public_key, **stamp)
    (env,) = bob.encrypt(alice.account_id, key)
    deliver(alice, env)
    assert deliver(alice, env) is None
    assert alice.verification.current(bob.account_id) == before
    assert alice.verification.take_outbox() == []
    assert "verification key out of turn" in alice.verification.ignored
    assert unverified(alice, bob)


def test_a_flow_times_out(cores: tuple[ClientCore, ClientCore, Clock]) -> None:
    alice, bob, clock = cores
    alice.verification.begin(bob.account_id)
    settle(alice, bob)
    clock.now += TIMEOUT_MS / 1000 + 1
    alice.verification.expire()
    assert states(alice, bob)[0] is State.CANCELLED
    settle(alice, bob)  # the cancel reaches Bob: he does not answer the stale request later
    vb = bob.verification.begin(alice.account_id)
    assert vb.state is State.REQUESTED  # a new request of his own


def test_crossing_requests_make_one_flow(cores: tuple[ClientCore, ClientCore, Clock]) -> None:
    alice, bob, _ = cores
    alice.verification.begin(bob.account_id)
    bob.verification.begin(alice.account_id)
    settle(alice, bob)
    va, vb = alice.verification.current(bob.account_id), bob.verification.current(alice.account_id)
    assert va is not None and vb is not None and va.txn == vb.txn
    assert va.state is vb.state is State.COMPARING
    alice.verification.confirm(va.txn, True)
    bob.verification.confirm(vb.txn, True)
    settle(alice, bob)
    assert states(alice, bob) == (State.VERIFIED, State.VERIFIED)


def test_an_identity_change_breaks_the_verification_until_a_fresh_sas(
    cores: tuple[ClientCore, ClientCore, Clock],
) -> None:
    """Cannot happen through the chain (an ID names its identity); checked all the same."""
    alice, bob, _ = cores
    va, vb = to_comparing(alice, bob)
    alice.verification.confirm(va.txn, True)
    bob.verification.confirm(vb.txn, True)
    settle(alice, bob)
    pins = alice.pinned(bob.account_id)
    assert pins is not None
    alice._save_pins(msgspec.structs.replace(pins, identity=AccountKey().public))
    with pytest.raises(VerificationBroken):
        alice.encrypt(bob.account_id, alice.new_text(bob.account_id, "no"))
    alice._save_pins(pins)  # the old identity back: still broken, until verified again
    assert alice.verification.status(bob.account_id) == (
        Status.BROKEN,
        "its identity key changed",
    )
    with pytest.raises(VerificationBroken):
        alice.check_verified(bob.account_id, alice.new_text(bob.account_id, "no"))
    alice.check_verified(bob.account_id, VerifyCancel(id=b"1", ts=1))  # verifying may go on
    va, vb = to_comparing(alice, bob)
    alice.verification.confirm(va.txn, True)
    bob.verification.confirm(vb.txn, True)
    settle(alice, bob)
    assert alice.verification.status(bob.account_id) == (Status.VERIFIED, "")
    assert alice.encrypt(bob.account_id, alice.new_text(bob.account_id, "yes"))


def test_payloads_round_trip_and_the_emoji_table() -> None:
    assert len(EMOJI) == 64 and len({name for _, name in EMOJI}) == 64
    assert EMOJI[0] == ("\U0001f436", "Dog") and EMOJI[63] == ("\U0001f4cc", "Pin")
    decoder = msgspec.msgpack.Decoder(Payload)
    for p in (
        VerifyRequest(id=b"1", ts=1, txn=b"t" * 16),
        VerifyKey(id=b"2", ts=2, txn=b"t", for_device="d", key="k"),
        VerifyMac(id=b"3", ts=3, txn=b"t", identity_mac="i", device_mac="d"),
        VerifyCancel(id=b"4", ts=4, txn=b"t", code="mismatch", reason="r"),
    ):
        assert decoder.decode(msgspec.msgpack.encode(p)) == p
    with pytest.raises(msgspec.ValidationError):
        decoder.decode(msgspec.msgpack.encode(VerifyKey(id=b"5", ts=5, key="k" * 65)))
