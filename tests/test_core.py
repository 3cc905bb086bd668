"""The sans-IO client core: cores talk with no server and no network in between."""

from __future__ import annotations

import random
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from kluis.client.core import ClientCore, Dummy, Sealed, Sync, Text, link_fingerprint
from kluis.client.store import ClientStore, MemoryStore, ProfileStore
from kluis.crypto import padding, seal
from kluis.crypto.account_key import AccountKey
from kluis.crypto.olm import OlmSession
from kluis.crypto.profile_key import new_params
from kluis.errors import BadSignature, DecryptionError, UntrustedDevice
from kluis.identity import chain
from kluis.protocol.frames import Bundle, DeviceRecord, InEnvelope, OutEnvelope, Revocation


def make_core(
    tmp_path: Path,
    name: str,
    primary: ClientCore | None = None,
    *,
    clock: Callable[[], float] = time.time,
    random: Callable[[int], bytes] = secrets.token_bytes,
    on_disk: bool = False,
) -> ClientCore:
    """The first device of a new account, or (with ``primary``) a device linked to its account.

    In memory, unless ``on_disk`` asks for the encrypted SQLite profile in ``tmp_path / name``.
    """
    store: ClientStore = (
        ProfileStore.create(tmp_path / name, "pw", new_params(time_cost=1, memory_kib=8192))
        if on_disk
        else MemoryStore()
    )
    core = ClientCore.create(
        store, "http://unused", clock=clock, random=random, new_account=primary is None
    )
    core.set_account(core.new_account_id() if primary is None else primary.account_id)
    return core


def record(core: ClientCore, primary: ClientCore | None = None) -> DeviceRecord:
    """``core``'s device, certified by its account's identity (held by ``primary``)."""
    if primary is None:
        return core.own_record()
    keys = core.device_keys()
    return primary.approve(keys, link_fingerprint(keys))


def show(viewer: ClientCore, owner: ClientCore, *records: DeviceRecord) -> chain.ChainView:
    return viewer.accept_devices(owner.account_id, owner.identity_key, list(records), [])


def bundle(core: ClientCore, primary: ClientCore | None = None) -> Bundle:
    otks, _ = core.keys_to_upload(0)
    core.keys_published()
    return Bundle(device=record(core, primary), one_time_key=otks[0], fallback=False)


def connect(sender: ClientCore, receiver: ClientCore) -> None:
    show(sender, receiver, record(receiver))
    show(receiver, sender, record(sender))
    sender.add_bundles(receiver.account_id, [bundle(receiver)])


def deliver(receiver: ClientCore, env: OutEnvelope, env_id: int = 1):  # type: ignore[no-untyped-def]
    opened = receiver.open_envelope(InEnvelope(id=env_id, body=env.body))
    return None if opened is None else receiver.decrypt(opened)


def text_for(sender: ClientCore, receiver: ClientCore, text: str) -> OutEnvelope:
    (env,) = sender.encrypt(receiver.account_id, sender.new_text(receiver.account_id, text))
    return env


@pytest.fixture
def pair(tmp_path: Path) -> tuple[ClientCore, ClientCore]:
    alice = make_core(tmp_path, "alice")
    bob = make_core(tmp_path, "bob")
    connect(alice, bob)
    return alice, bob


def test_round_trip_and_reply(pair: tuple[ClientCore, ClientCore]) -> None:
    alice, bob = pair
    m = deliver(bob, text_for(alice, bob, "hi bob"))
    assert m is not None and (m.sender, m.conversation, m.text) == (
        alice.account_id,
        alice.account_id,
        "hi bob",
    )
    # Bob answers on the session Alice opened: no key claim needed.
    assert bob.devices_without_session(alice.account_id) == []
    assert deliver(alice, text_for(bob, alice, "hi alice")).text == "hi alice"


def test_out_of_order_delivery(pair: tuple[ClientCore, ClientCore]) -> None:
    alice, bob = pair
    envs = [text_for(alice, bob, f"m{i}") for i in range(8)]
    order = list(range(8))
    random.Random(4).shuffle(order)
    got = [deliver(bob, envs[i], i + 1).text for i in order]
    assert got == [f"m{i}" for i in order]
    assert {m.text for m in bob.history(alice.account_id)} == {f"m{i}" for i in range(8)}


def test_duplicate_and_replay_are_shown_once(pair: tuple[ClientCore, ClientCore]) -> None:
    alice, bob = pair
    env = text_for(alice, bob, "once")
    assert deliver(bob, env).text == "once"
    assert deliver(bob, env, 2) is None  # same envelope again
    # The same message id re-encrypted (a resend) is recognised too.
    payload = alice.new_text(bob.account_id, "resent")
    (e1,) = alice.encrypt(bob.account_id, payload)
    (e2,) = alice.encrypt(bob.account_id, payload)
    assert deliver(bob, e1, 3).text == "resent"
    assert deliver(bob, e2, 4) is None


def test_tampered_box_fails_cleanly(pair: tuple[ClientCore, ClientCore]) -> None:
    alice, bob = pair
    env = text_for(alice, bob, "x")
    for i in (0, 5, 40, len(env.body) - 1):
        body = bytearray(env.body)
        body[i] ^= 0x80
        with pytest.raises(DecryptionError):
            bob.open_envelope(InEnvelope(id=1, body=bytes(body)))
    assert deliver(bob, env).text == "x"  # the untouched original still decrypts


def test_chain_takes_only_devices_the_identity_certified(tmp_path: Path) -> None:
    alice = make_core(tmp_path, "alice")
    bob = make_core(tmp_path, "bob")
    bob2 = make_core(tmp_path, "bob2", primary=bob)
    mallory = make_core(tmp_path, "mallory")
    view = show(alice, bob, record(bob), record(bob2, bob))
    assert len(view.trusted) == 2 and not view.untrusted
    assert len(alice.devices_for_sending(bob.account_id)) == 2

    # A device certified by another identity, or not at all, is refused; sending stops.
    forged = DeviceRecord(keys=mallory.device_keys(), cert=mallory.own_record().cert)
    view = show(alice, bob, record(bob), record(bob2, bob), forged)
    assert [d for d, _ in view.untrusted] == [mallory.device_id]
    with pytest.raises(UntrustedDevice):
        alice.devices_for_sending(bob.account_id)

    # A device's keys never change, even with a certificate (the account key's holder lies).
    other = make_core(tmp_path, "other")
    swapped_keys = other.device_keys().__class__(
        ed25519=bob2.device_id,
        curve25519=other.device_keys().curve25519,
        seal=other.device_keys().seal,
        sig=bob2.device_keys().sig,
    )
    swapped = DeviceRecord(keys=swapped_keys, cert=record(bob2, bob).cert)
    assert show(alice, bob, record(bob), swapped).untrusted

    # An identity key that is not the account's: the whole list is refused.
    with pytest.raises(UntrustedDevice):
        alice.accept_devices(bob.account_id, mallory.identity_key, [record(bob)], [])

    # Revoked (signed by the identity): gone, and it never comes back, even if relisted.
    revocation = bob.revocation(bob2.device_id)
    alice.accept_devices(bob.account_id, bob.identity_key, [record(bob)], [revocation])
    view = show(alice, bob, record(bob), record(bob2, bob))
    assert [d for d, _ in view.untrusted] == [bob2.device_id]
    # An unsigned revocation changes nothing.
    bogus = Revocation(device=bob.device_id, sig=revocation.sig)
    assert (
        bob.device_id
        not in alice.accept_devices(
            bob.account_id, bob.identity_key, [record(bob)], [bogus]
        ).revoked
    )


def test_own_account_alarms_on_a_device_it_did_not_certify(tmp_path: Path) -> None:
    bob = make_core(tmp_path, "bob")
    mallory = make_core(tmp_path, "mallory")
    planted = DeviceRecord(keys=mallory.device_keys(), cert="A" * 86)
    show(bob, bob, record(bob), planted)
    assert bob.alarms() and mallory.device_id in bob.alarms()[0]
    assert bob.device_status(planted).startswith("REFUSED")


def test_only_the_identity_holder_certifies_and_revokes_others(tmp_path: Path) -> None:
    bob = make_core(tmp_path, "bob")
    bob2 = make_core(tmp_path, "bob2", primary=bob)
    newcomer = make_core(tmp_path, "newcomer", primary=bob)
    assert bob.holds_identity and not bob2.holds_identity
    with pytest.raises(Exception, match="first device"):
        bob2.approve(newcomer.device_keys(), link_fingerprint(newcomer.device_keys()))
    with pytest.raises(Exception, match="first device"):
        bob2.revocation(bob.device_id)
    own = bob2.revocation(bob2.device_id)  # a device may end itself
    chain.check_revocation(bob.account_id, bob.identity_key, own)


def test_finding3_link_code_fingerprint_has_128_bits_and_checks_keys(tmp_path: Path) -> None:
    bob = make_core(tmp_path, "bob")
    new = make_core(tmp_path, "new", primary=bob)
    other = make_core(tmp_path, "other", primary=bob)
    fingerprint = link_fingerprint(new.device_keys())
    assert re.fullmatch(r"[a-z2-7]{26,}", fingerprint)  # base32: 5 bits a letter, >= 128 bits
    with pytest.raises(BadSignature):  # the server swapped the keys behind the link code
        bob.approve(other.device_keys(), fingerprint)
    with pytest.raises(BadSignature):  # a prefix is not enough
        bob.approve(new.device_keys(), fingerprint[:8])


def test_finding3_only_canonical_key_encodings(tmp_path: Path) -> None:
    from kluis.crypto import seal
    from kluis.errors import CryptoError, MalformedFrame

    bob = make_core(tmp_path, "bob")
    keys = bob.device_keys()
    last = keys.seal[-1]
    sibling = (
        "AEIMQUYcgkosw048"[("AEIMQUYcgkosw048".index(last) + 1) % 16]
        if last in ("AEIMQUYcgkosw048")
        else last
    )
    # The same 32 bytes, spelled with ignored trailing bits or with padding: refused.
    for spelling in {keys.seal[:-1] + chr(ord(last) + 1), keys.seal + "=", sibling}:
        if spelling == keys.seal:
            continue
        with pytest.raises(CryptoError):
            seal.check_public_key(keys.seal[:-1] + chr(ord(last) + 1))
        with pytest.raises(MalformedFrame):
            chain.check_device_keys(
                keys.__class__(keys.ed25519, keys.curve25519, spelling, keys.sig)
            )
    with pytest.raises(MalformedFrame):
        chain.check_device_keys(
            keys.__class__(keys.ed25519 + "=", keys.curve25519, keys.seal, keys.sig)
        )
    chain.check_device_keys(keys)


def test_profile_survives_reopen(tmp_path: Path) -> None:
    """On the encrypted SQLite profile: what the core wrote is there after reopening."""
    alice = make_core(tmp_path, "alice", on_disk=True)
    bob = make_core(tmp_path, "bob", on_disk=True)
    connect(alice, bob)
    env = text_for(alice, bob, "before reopen")
    assert deliver(bob, env).text == "before reopen"
    env = text_for(alice, bob, "after reopen")
    bob.store.close()
    bob = ClientCore.load(
        ProfileStore.open(tmp_path / "bob", "pw"), clock=time.time, random=secrets.token_bytes
    )
    assert deliver(bob, env, 2).text == "after reopen"
    assert [m.text for m in bob.history(alice.account_id)] == ["before reopen", "after reopen"]
    alice.store.close()
    bob.store.close()


def test_history_is_oldest_first_by_sender_clock(tmp_path: Path) -> None:
    ticks = iter(range(1_700_000_000, 1_700_000_010))
    alice = make_core(tmp_path, "alice", clock=lambda: float(next(ticks)))  # a second a call
    bob = make_core(tmp_path, "bob")
    connect(alice, bob)
    envs = [text_for(alice, bob, f"m{i}") for i in range(3)]
    for i in (2, 0, 1):  # arrival order differs from sending order
        deliver(bob, envs[i], i + 1)
    assert [m.text for m in bob.history(alice.account_id)] == ["m0", "m1", "m2"]


def test_finding11_a_peer_timestamp_far_off_is_clamped(
    pair: tuple[ClientCore, ClientCore],
) -> None:
    alice, bob = pair
    for i, ts in enumerate((2**62, -(2**40), 2**63 - 1)):
        payload = msgspec.structs.replace(alice.new_text(bob.account_id, f"t{i}"), ts=ts)
        (env,) = alice.encrypt(bob.account_id, payload)
        m = deliver(bob, env, i + 1)
        assert m is not None and m.time.year < 3000  # shown near our own clock, no crash
    assert len(bob.history(alice.account_id)) == 3  # history still reads, every time


def test_public_api() -> None:
    import kluis.client

    assert kluis.client.__all__ == ["KluisClient", "Message"]


def test_safety_number_is_of_the_identity(tmp_path: Path) -> None:
    bob = make_core(tmp_path, "bob")
    alice = make_core(tmp_path, "alice")
    one = bob.safety_number(bob.account_id)
    assert re.fullmatch(r"(\d{5} ){5}\d{5}", one)
    show(alice, bob, record(bob))
    assert alice.safety_number(bob.account_id) == one
    bob2 = make_core(tmp_path, "bob2", primary=bob)
    show(alice, bob, record(bob), record(bob2, bob))  # a new device: same number
    assert alice.safety_number(bob.account_id) == one
    impostor = AccountKey()
    assert chain.safety_number(bob.account_id, impostor.public) != one


def test_payload_kinds_are_a_tagged_union_with_the_old_encoding(
    pair: tuple[ClientCore, ClientCore],
) -> None:
    alice, bob = pair
    text = alice.new_text(bob.account_id, "hi")
    copy = Sync(id=text.id, ts=text.ts, text=text.text, to=text.to)  # as earlier versions sent
    assert isinstance(text, Text) and isinstance(alice.new_dummy(bob.account_id), Dummy)
    # The same map as when the kind was a string field: earlier versions read it unchanged.
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(copy))
    assert wire["kind"] == "sync" and wire["id"] == text.id and wire["text"] == "hi"
    assert set(wire) == {
        "kind",
        "id",
        "ts",
        "sender",
        "sender_device",
        "recipient",
        "recipient_device",
        "text",
        "to",
    }
    # A dummy is accepted and shown nowhere.
    (env,) = alice.encrypt(bob.account_id, alice.new_dummy(bob.account_id))
    assert deliver(bob, env) is None and bob.history() == []


def test_an_unknown_payload_kind_is_undecryptable_and_quarantined(
    pair: tuple[ClientCore, ClientCore],
) -> None:
    """A kind from a later version (or a forged one) is a DecryptionError, never a crash."""
    alice, bob = pair
    peer = f"{bob.account_id}/{bob.device_id}"
    row_id, pickled = alice.store.sessions(peer)[0]
    session = OlmSession.from_pickle(pickled.decode(), alice.store.pickle_key)
    fields = {
        "kind": "reaction",
        "id": b"x" * 16,
        "ts": 1,
        "sender": alice.account_id,
        "sender_device": alice.device_id,
        "recipient": bob.account_id,
        "recipient_device": bob.device_id,
        "to": bob.account_id,
    }
    msg_type, body = session.encrypt(padding.pad(msgspec.msgpack.encode(fields)))
    alice.store.save_session(row_id, peer, session.pickle(alice.store.pickle_key).encode(), 0)
    inner = Sealed(
        account=alice.account_id,
        device=alice.device_id,
        curve=alice.device_keys().curve25519,
        type=msg_type,
        body=body,
    )
    keys = bob.device_keys()
    box = seal.seal(keys.seal, msgspec.msgpack.encode(inner), keys.ed25519.encode())
    env = InEnvelope(id=1, body=box)
    opened = bob.open_envelope(env)
    assert opened is not None
    with pytest.raises(DecryptionError, match="malformed"):
        bob.decrypt(opened)
    bob.quarantine(env, DecryptionError("x"))
    assert bob.quarantined() == 1 and bob.history() == []
    assert bob.open_envelope(env) is None  # never processed again by itself
    # The session still works afterwards.
    assert deliver(bob, text_for(alice, bob, "still here"), 2).text == "still here"


def test_the_core_draws_ids_from_the_injected_random_source(tmp_path: Path) -> None:
    core = make_core(tmp_path, "alice", random=lambda n: b"\x07" * n)
    assert core.new_text("someone", "x").id == b"\x07" * 16
    assert core.new_dummy("someone").id == b"\x07" * 16


def test_a_peer_writes_only_in_its_conversation_with_us(
    pair: tuple[ClientCore, ClientCore], tmp_path: Path
) -> None:
    alice, bob = pair
    # Alice files a message into Bob's conversation with someone else: refused, not stored.
    elsewhere = alice.new_text("C" * 16, "planted")
    (env,) = alice.encrypt(bob.account_id, elsewhere)
    with pytest.raises(UntrustedDevice, match="another conversation"):
        deliver(bob, env)
    # Only our own devices may send us copies of what we wrote.
    copy = Sync(id=b"\x01" * 16, ts=0, text="I said this", to=alice.account_id)
    (env,) = alice.encrypt(bob.account_id, copy)
    with pytest.raises(UntrustedDevice, match="own devices"):
        deliver(bob, env, 2)
    assert bob.history() == []
    # Our own second device files what we wrote under the conversation it names.
    laptop = make_core(tmp_path, "laptop", alice)
    show(laptop, alice, record(alice), record(laptop, alice))
    show(alice, alice, record(alice), record(laptop, alice))
    alice.add_bundles(alice.account_id, [bundle(laptop, alice)])
    (env,) = alice.encrypt(alice.account_id, alice.new_text(bob.account_id, "to bob"))
    m = deliver(laptop, env)
    assert (m.sender, m.conversation, m.text) == (alice.account_id, bob.account_id, "to bob")


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_bad_envelope_in_a_batch_rolls_back_only_its_own_writes(
    tmp_path: Path, on_disk: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = make_core(tmp_path, "alice", on_disk=on_disk)
    bob = make_core(tmp_path, "bob", on_disk=on_disk)
    connect(alice, bob)
    assert deliver(bob, text_for(alice, bob, "first")).text == "first"  # the pre-key message
    bad_payload = alice.new_text(bob.account_id, "bad")
    envs = [
        text_for(alice, bob, "m1"),
        *alice.encrypt(bob.account_id, bad_payload),
        text_for(alice, bob, "m2"),
    ]
    add_message = bob.store.add_message

    def fail_on_bad(peer: str, value: bytes) -> None:
        add_message(peer, value)  # a write of its own, rolled back with the rest
        if b"bad" in value:
            raise RuntimeError("failed after its session advanced and it was marked seen")

    monkeypatch.setattr(bob.store, "add_message", fail_on_bad)
    shown = []
    with bob.batch():
        for i, env in enumerate(envs, start=2):
            opened = bob.open_envelope(InEnvelope(id=i, body=env.body))
            assert opened is not None
            try:
                shown.append(bob.decrypt(opened))
            except RuntimeError as exc:
                bob.quarantine(opened.envelope, exc)
    monkeypatch.undo()
    assert [m.text for m in shown if m] == ["m1", "m2"]
    assert [m.text for m in bob.history(alice.account_id)] == ["first", "m1", "m2"]
    assert bob.quarantined() == 1
    assert not bob.store.seen(b"msg:" + bad_payload.id)  # its own writes were rolled back
    # ...its Olm session step too: the message decrypts again (skipped over, then rolled back).
    opened = bob.open_envelope(InEnvelope(id=9, body=envs[1].body))
    assert opened is None  # quarantined: never processed again by itself
    sealed = msgspec.msgpack.decode(
        bob._seal.open(envs[1].body, bob.device_id.encode()), type=Sealed
    )
    from kluis.client.records import Opened

    again = bob.decrypt(Opened(InEnvelope(id=9, body=envs[1].body), sealed))
    assert again is not None and again.text == "bad"


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_batch_that_fails_keeps_nothing(tmp_path: Path, on_disk: bool) -> None:
    """Nothing of a batch is kept unless all of it commits (so nothing of it is acknowledged),
    and the in-memory Olm account forgets the one-time key a pre-key message used."""
    alice = make_core(tmp_path, "alice", on_disk=on_disk)
    bob = make_core(tmp_path, "bob", on_disk=on_disk)
    connect(alice, bob)
    env = text_for(alice, bob, "pre-key")
    with pytest.raises(KeyboardInterrupt), bob.batch():
        assert deliver(bob, env).text == "pre-key"
        raise KeyboardInterrupt  # e.g. killed before the commit
    assert bob.history() == []
    assert deliver(bob, env).text == "pre-key"  # the redelivery decrypts: nothing was lost
