"""The sans-IO client core: two cores talk with no server and no network in between."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kluis.client.core import ClientCore, link_fingerprint
from kluis.client.store import ProfileStore
from kluis.crypto.profile_key import new_params
from kluis.errors import BadSignature, DecryptionError, KeyChanged
from kluis.protocol.frames import Bundle, DeviceRecord, InEnvelope, OutEnvelope


def make_core(tmp_path: Path, name: str, account: str) -> ClientCore:
    store = ProfileStore.create(tmp_path / name, "pw", new_params(time_cost=1, memory_kib=8192))
    core = ClientCore.create(store, "http://unused")
    core.set_account(account)
    return core


def record(core: ClientCore) -> DeviceRecord:
    return DeviceRecord(keys=core.device_keys())


def bundle(core: ClientCore) -> Bundle:
    otks, _ = core.keys_to_upload(0)
    core.keys_published()
    return Bundle(device=record(core), one_time_key=otks[0], fallback=False)


def connect(sender: ClientCore, receiver: ClientCore) -> None:
    sender.accept_devices(receiver.account_id, [record(receiver)])
    receiver.accept_devices(sender.account_id, [record(sender)])
    sender.add_bundles(receiver.account_id, [bundle(receiver)])


def deliver(receiver: ClientCore, env: OutEnvelope, env_id: int = 1):  # type: ignore[no-untyped-def]
    opened = receiver.open_envelope(InEnvelope(id=env_id, body=env.body))
    return None if opened is None else receiver.decrypt(opened)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[ClientCore, ClientCore]:
    alice = make_core(tmp_path, "alice", "a" * 16)
    bob = make_core(tmp_path, "bob", "b" * 16)
    connect(alice, bob)
    return alice, bob


def test_round_trip_and_reply(pair: tuple[ClientCore, ClientCore]) -> None:
    alice, bob = pair
    (env,) = alice.encrypt(bob.account_id, alice.new_payload("text", "hi bob"))
    m = deliver(bob, env)
    assert m is not None and (m.sender, m.peer, m.text) == (
        alice.account_id,
        alice.account_id,
        "hi bob",
    )
    # Bob answers on the session Alice opened: no key claim needed.
    assert bob.devices_without_session(alice.account_id) == []
    (back,) = bob.encrypt(alice.account_id, bob.new_payload("text", "hi alice"))
    assert deliver(alice, back).text == "hi alice"


def test_out_of_order_delivery(pair: tuple[ClientCore, ClientCore]) -> None:
    alice, bob = pair
    envs = [alice.encrypt(bob.account_id, alice.new_payload("text", f"m{i}"))[0] for i in range(8)]
    order = list(range(8))
    random.Random(4).shuffle(order)
    got = [deliver(bob, envs[i], i + 1).text for i in order]
    assert got == [f"m{i}" for i in order]
    assert {m.text for m in bob.history(alice.account_id)} == {f"m{i}" for i in range(8)}


def test_duplicate_and_replay_are_shown_once(pair: tuple[ClientCore, ClientCore]) -> None:
    alice, bob = pair
    (env,) = alice.encrypt(bob.account_id, alice.new_payload("text", "once"))
    assert deliver(bob, env).text == "once"
    assert deliver(bob, env, 2) is None  # same envelope again
    # The same message id re-encrypted (a resend) is recognised too.
    payload = alice.new_payload("text", "resent")
    (e1,) = alice.encrypt(bob.account_id, payload)
    (e2,) = alice.encrypt(bob.account_id, payload)
    assert deliver(bob, e1, 3).text == "resent"
    assert deliver(bob, e2, 4) is None


def test_tampered_box_fails_cleanly(pair: tuple[ClientCore, ClientCore]) -> None:
    alice, bob = pair
    (env,) = alice.encrypt(bob.account_id, alice.new_payload("text", "x"))
    for i in (0, 5, 40, len(env.body) - 1):
        body = bytearray(env.body)
        body[i] ^= 0x80
        with pytest.raises(DecryptionError):
            bob.open_envelope(InEnvelope(id=1, body=bytes(body)))
    assert deliver(bob, env).text == "x"  # the untouched original still decrypts


def test_pinning_accepts_approved_devices_and_stops_on_changes(tmp_path: Path) -> None:
    alice = make_core(tmp_path, "alice", "a" * 16)
    bob = make_core(tmp_path, "bob", "b" * 16)
    bob2 = make_core(tmp_path, "bob2", "b" * 16)
    mallory = make_core(tmp_path, "mallory", "m" * 16)
    alice.accept_devices(bob.account_id, [record(bob)])  # first use: pinned

    approved = bob.approve(bob2.device_keys(), link_fingerprint(bob2.device_keys()))
    alice.accept_devices(bob.account_id, [record(bob), approved])  # vouched for: accepted
    assert len(alice.trusted_devices(bob.account_id) or []) == 2

    with pytest.raises(KeyChanged):  # a device no pinned device approved
        alice.accept_devices(bob.account_id, [record(bob), approved, record(mallory)])
    assert alice.pending_key_change(bob.account_id)
    assert alice.trusted_devices(bob.account_id) is None
    with pytest.raises(KeyChanged):  # still pending: nothing is used silently
        alice.accept_devices(bob.account_id, [record(bob), approved])
    alice.acknowledge_key_change(bob.account_id)
    assert len(alice.trusted_devices(bob.account_id) or []) == 3


def test_approval_checks_the_fingerprint_and_signatures(tmp_path: Path) -> None:
    bob = make_core(tmp_path, "bob", "b" * 16)
    new = make_core(tmp_path, "new", "")
    other = make_core(tmp_path, "other", "")
    with pytest.raises(BadSignature):  # the server swapped the keys behind the link code
        bob.approve(other.device_keys(), link_fingerprint(new.device_keys()))
    forged = DeviceRecord(keys=new.device_keys(), approver=bob.device_id, approval="A" * 86)
    alice = make_core(tmp_path, "alice", "a" * 16)
    alice.accept_devices(bob.account_id, [record(bob)])
    with pytest.raises(BadSignature):
        alice.accept_devices(bob.account_id, [record(bob), forged])


def test_profile_survives_reopen(tmp_path: Path, pair: tuple[ClientCore, ClientCore]) -> None:
    alice, bob = pair
    (env,) = alice.encrypt(bob.account_id, alice.new_payload("text", "before reopen"))
    bob.store.close()
    bob = ClientCore.load(ProfileStore.open(tmp_path / "bob", "pw"))
    assert deliver(bob, env).text == "before reopen"


def test_history_is_oldest_first_by_sender_clock(pair: tuple[ClientCore, ClientCore]) -> None:
    alice, bob = pair
    ticks = iter(range(1_800_000_000, 1_800_000_010))
    alice._clock = lambda: float(next(ticks))  # injected: one second per message
    envs = [alice.encrypt(bob.account_id, alice.new_payload("text", f"m{i}"))[0] for i in range(3)]
    for i in (2, 0, 1):  # arrival order differs from sending order
        deliver(bob, envs[i], i + 1)
    assert [m.text for m in bob.history(alice.account_id)] == ["m0", "m1", "m2"]


def test_public_api() -> None:
    import kluis.client

    assert kluis.client.__all__ == ["KluisClient", "Message"]


def test_safety_number(tmp_path: Path) -> None:
    import re

    from kluis.client.core import safety_number

    bob = make_core(tmp_path, "bob", "b" * 16)
    bob2 = make_core(tmp_path, "bob2", "b" * 16)
    one = safety_number(bob.account_id, [record(bob)])
    assert re.fullmatch(r"(\d{5} ){5}\d{5}", one)
    assert safety_number(bob.account_id, [record(bob)]) == one  # stable
    both = safety_number(bob.account_id, [record(bob), record(bob2)])
    assert both != one and both == safety_number(bob.account_id, [record(bob2), record(bob)])
    assert safety_number("c" * 16, [record(bob)]) != one  # bound to the account too
