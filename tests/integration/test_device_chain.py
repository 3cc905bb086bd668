"""A hostile server against the device chain, and a hostile peer against the receiving client.

Regression tests for the adversarial review of c4b3566 (issue: findings 1, 3, 4, 6, 7, 11, 12,
15), each named after its finding. The server is made hostile the way a seizure or a takeover
would: by writing its database directly while it is stopped, then serving again. A hostile peer
is a second, real client that sends what an honest one never would.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from pathlib import Path

import msgspec
import pytest

from kluis.client.client import KluisClient
from kluis.client.core import RECOVERY_DELAY_MS, ClientCore, Sealed
from kluis.client.store import ProfileStore
from kluis.crypto import seal
from kluis.crypto.account_key import AccountKey
from kluis.crypto.profile_key import new_params
from kluis.errors import BadSignature, TransportError, UntrustedDevice
from kluis.identity.chain import account_id_for, certify
from kluis.protocol import frames as f
from kluis.server.inprocess import InProcessServer
from tests.kluis_testing import (
    PASSPHRASE,
    RawConnection,
    Server,
    ServerProcess,
    data_dir,
    fast_kdf,
    link_device,
    open_profile,
    reconnect,
    register,
    transport_factory,
)


def db_write(server: ServerProcess, *statements: tuple[str, tuple[object, ...]]) -> None:
    """What a server taken over can do: change its own database, then serve again."""
    server.stop()
    db = sqlite3.connect(server.data / "kluis.sqlite3")
    for sql, args in statements:
        db.execute(sql, args)
    db.commit()
    db.close()
    server.start()


async def reopen(path: Path) -> KluisClient:
    client = KluisClient.open(path, PASSPHRASE)
    await client.connect()
    return client


def stray_core(tmp_path: Path, name: str) -> ClientCore:
    store = ProfileStore.create(tmp_path / name, "pw", new_params(time_cost=1, memory_kib=8192))
    return ClientCore.create(store, "http://unused", clock=time.time, random=secrets.token_bytes)


def stray_device(tmp_path: Path, name: str) -> tuple[None, f.DeviceKeys]:
    """A device the server made up: real keys, self-signed, never certified by the account."""
    core = stray_core(tmp_path, name)
    keys = core.device_keys()
    core.store.close()
    return None, keys


def insert_device(account: str, record: f.DeviceRecord) -> tuple[str, tuple[object, ...]]:
    return (
        "INSERT INTO devices(id, account_id, record, created_at, curve) VALUES (?, ?, ?, ?, ?)",
        (
            record.keys.ed25519,
            account,
            msgspec.msgpack.encode(record),
            int(time.time()),
            record.keys.curve25519,
        ),
    )


def envelope_devices(server: Server) -> list[str]:
    db = sqlite3.connect(data_dir(server) / "kluis.sqlite3")
    try:
        return [r[0] for r in db.execute("SELECT device_id FROM envelopes")]
    finally:
        db.close()


def one_time_keys_left(server: Server, device: str) -> int:
    db = sqlite3.connect(data_dir(server) / "kluis.sqlite3")
    try:
        row = db.execute("SELECT COUNT(*) FROM one_time_keys WHERE device_id = ?", (device,))
        return int(row.fetchone()[0])
    finally:
        db.close()


def forged_envelope(recipient: f.DeviceKeys, claim: Sealed) -> f.OutEnvelope:
    """Anyone can seal to a device's public sealing key, claiming to be anyone."""
    box = seal.seal(recipient.seal, msgspec.msgpack.encode(claim), recipient.ed25519.encode())
    return f.OutEnvelope(device=recipient.ed25519, body=box)


async def send_raw(sender: KluisClient, account: str, envelopes: list[f.OutEnvelope]) -> None:
    await sender.transport.request(lambda rid: f.Send.one(rid, account, envelopes), f.Done)


# ---- the device chain against a hostile server ------------------------------------------------


async def test_finding4_device_inserted_into_a_new_account_is_refused_and_alarms(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Must show: a server inserts a device into an account (a direct database write): every
    peer refuses it, the owner's client alarms, safety numbers stay equal for the honest chain."""
    alice = await register(server, tmp_path / "alice")  # hostile from the account's creation
    bob = await register(server, tmp_path / "bob")
    alice_number = await alice.safety_number()
    await alice.close()
    await bob.close()
    _, planted_keys = stray_device(tmp_path, "planted")
    # As c4b3566 let it: no approver at all; and one "certified" by a key of the server's own.
    server_key = AccountKey()
    planted = [
        f.DeviceRecord(keys=planted_keys, cert="A" * 86),
        certify(server_key, alice.account_id, stray_device(tmp_path, "planted2")[1]),
    ]
    db_write(server, *(insert_device(alice.account_id, r) for r in planted))

    alice = await reopen(tmp_path / "alice")
    alarms = alice.alarms()
    assert len(alarms) == 2 and all("not certified" in a for a in alarms)
    statuses = {r.keys.ed25519: alice.core.device_status(r) for r in await alice.devices()}
    assert statuses[planted_keys.ed25519].startswith("REFUSED")
    assert statuses[alice.core.device_id] == "certified"

    bob = await reopen(tmp_path / "bob")
    with pytest.raises(UntrustedDevice):  # Bob's first contact: refused, nothing written
        await bob.send(alice.account_id, "must not reach the planted device")
    assert envelope_devices(server) == []
    # The identity is the same for both: Bob's number of Alice equals Alice's own.
    assert await bob.safety_number(alice.account_id) == alice_number
    await alice.close()
    await bob.close()


async def test_a_swapped_identity_key_is_refused_and_has_no_equal_safety_number(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    alice_number = await alice.safety_number()
    await alice.close()
    # The server hands out an identity of its own for Alice, certifying a device of its own.
    server_key = AccountKey()
    _, fake_keys = stray_device(tmp_path, "fake")
    fake = certify(server_key, alice.account_id, fake_keys)
    await bob.close()
    db_write(
        server,
        ("UPDATE accounts SET identity = ? WHERE id = ?", (server_key.public, alice.account_id)),
        insert_device(alice.account_id, fake),
    )
    bob = await reopen(tmp_path / "bob")
    with pytest.raises(UntrustedDevice, match="identity"):
        await bob.send(alice.account_id, "to whom?")
    with pytest.raises(UntrustedDevice):  # no number to compare: the chain does not hold
        await bob.safety_number(alice.account_id)
    assert account_id_for(server_key.public) != alice.account_id
    # Alice's own client refuses the server's story about her account.
    with pytest.raises(UntrustedDevice):
        await reopen(tmp_path / "alice")
    assert alice_number  # (her number, from her own key, never changed)
    await bob.close()


async def test_finding3_swapped_pending_link_is_refused(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Must show: the server swaps a pending link's keys for its own device's: the approving
    device refuses (the code carries 130 bits of the real keys), the server's device stays out."""
    alice = await register(server, tmp_path / "alice")
    code = await KluisClient.request_link(
        server.url, tmp_path / "laptop", PASSPHRASE, kdf=fast_kdf()
    )
    token = code.split("-", 1)[0]
    assert len(code.split("-", 1)[1]) >= 26  # >= 128 bits of fingerprint
    _, server_keys = stray_device(tmp_path, "server-device")
    await alice.close()
    swapped = msgspec.msgpack.encode(f.PendingLink(device=server_keys))
    db_write(server, ("UPDATE links SET keys = ? WHERE token = ?", (swapped, token)))
    alice = await reopen(tmp_path / "alice")
    with pytest.raises(BadSignature):
        await alice.approve(code)
    assert [r.keys.ed25519 for r in await alice.devices()] == [alice.core.device_id]
    await alice.close()


async def test_finding12_revoked_device_cannot_return_or_vouch(
    server: ServerProcess, tmp_path: Path
) -> None:
    bob = await register(server, tmp_path / "bob")
    bob2 = await link_device(bob, server, tmp_path / "bob2")
    alice = await register(server, tmp_path / "alice")
    await alice.send(bob.account_id, "to both of bob's devices")
    with pytest.raises(Exception, match="first device"):  # a second device vouches for nobody
        await bob2.approve("abcdefghijkl-" + "a" * 26)
    bob2_id = bob2.core.device_id
    await bob2.close()
    await bob.revoke(bob2_id)
    await alice.send(bob.account_id, "only to bob's first device")  # Alice saw the revocation
    await alice.close()
    await bob.close()
    # The server brings the revoked device back, and adds one "approved" by it (c4b3566: the
    # approval of any device once pinned counted, revoked or not).
    _, newcomer_keys = stray_device(tmp_path, "newcomer")
    bob2_key = KluisClient.open(tmp_path / "bob2", PASSPHRASE)
    vouched = f.DeviceRecord(
        keys=newcomer_keys,
        cert=bob2_key.core._account.sign(
            __import__("kluis.protocol.signing", fromlist=["x"]).device_cert_message(
                bob.account_id, newcomer_keys
            )
        ),
    )
    bob2_key.core.store.close()
    db_write(
        server,
        ("UPDATE devices SET revoked = 0 WHERE id = ?", (bob2_id,)),
        insert_device(bob.account_id, vouched),
    )
    alice = await reopen(tmp_path / "alice")
    with pytest.raises(UntrustedDevice):
        await alice.send(bob.account_id, "must reach neither")
    view = await alice.refresh_devices(bob.account_id)
    assert {d for d, _ in view.untrusted} == {bob2_id, newcomer_keys.ed25519}
    assert [r.keys.ed25519 for r in view.trusted] == [bob.core.device_id]
    await alice.close()
    # Bob's own client, which signed the revocation, alarms on both.
    bob = await reopen(tmp_path / "bob")
    assert len(bob.alarms()) == 2
    await bob.close()


# ---- a hostile peer against the receiving client -----------------------------------------------


async def test_finding1_forged_sender_of_an_unknown_account_does_not_wedge_the_inbox(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    server = inproc  # joined in memory: this test needs no socket
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    mallory = await register(server, tmp_path / "mallory")
    alice_keys = alice.core.device_keys()
    claim = Sealed(account="nosuchaccount234", device="x" * 43, curve="y" * 43, type=0, body=b"z")
    await send_raw(mallory, alice.account_id, [forged_envelope(alice_keys, claim)])
    await bob.send(alice.account_id, "after the forgery")
    got = await alice.receive(wait=5, until=1)
    assert [m.text for m in got] == ["after the forgery"]
    assert alice.quarantined == 1 and len(alice.errors) == 1
    await alice.close()
    alice = await reconnect(server, tmp_path / "alice")  # nothing comes back on the next connection
    assert await alice.receive(wait=1) == [] and alice.errors == []
    assert alice.quarantined == 1
    for c in (alice, bob, mallory):
        await c.close()


async def test_finding7_forged_claims_cause_no_network_action(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    server = inproc  # joined in memory: this test needs no socket
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    mallory = await register(server, tmp_path / "mallory")
    await bob.send(alice.account_id, "hello alice")  # Alice knows Bob's device now
    assert [m.text for m in await alice.receive(wait=5, until=1)] == ["hello alice"]
    bob_keys_before = one_time_keys_left(server, bob.core.device_id)
    alice_keys = alice.core.device_keys()
    bob_curve = bob.core.device_keys().curve25519
    forgeries = [
        # garbage "from Bob" (c4b3566: Alice claimed Bob's keys and sent him dummies)
        Sealed(bob.account_id, bob.core.device_id, bob_curve, 1, b"junk"),
        Sealed(bob.account_id, bob.core.device_id, bob_curve, 0, b"junk"),
        # "from Mallory's own device" (c4b3566: a read receipt within 0.5 s)
        Sealed(
            mallory.account_id,
            mallory.core.device_id,
            mallory.core.device_keys().curve25519,
            1,
            b"junk",
        ),
        # naming 51 made-up devices of Bob (c4b3566: rate_limited in every later receive)
        *(Sealed(bob.account_id, f"{i:043d}", bob_curve, 0, b"junk") for i in range(51)),
    ]
    for claim in forgeries:  # one envelope per send: a send addresses each device once
        await send_raw(mallory, alice.account_id, [forged_envelope(alice_keys, claim)])
    assert await alice.receive(wait=3) == []
    assert alice.quarantined == len(forgeries)
    assert await mallory.receive(wait=1.5) == []  # no answer to Mallory's device
    assert one_time_keys_left(server, bob.core.device_id) == bob_keys_before  # nothing claimed
    await bob.send(alice.account_id, "still readable")  # and later receives are not wedged
    assert [m.text for m in await alice.receive(wait=5, until=1)] == ["still readable"]
    # Recovery for the one trusted device whose "message" failed: only after the delay, once.
    real_clock = alice.core._clock
    alice.core._clock = lambda: real_clock() + RECOVERY_DELAY_MS / 1000 + 1
    await alice.receive(wait=0.2)
    after_one = one_time_keys_left(server, bob.core.device_id)
    assert after_one == bob_keys_before - 1  # one fresh session, for the device Alice trusts
    await send_raw(mallory, alice.account_id, [forged_envelope(alice_keys, forgeries[0])])
    alice.core._clock = lambda: real_clock() + 3 * RECOVERY_DELAY_MS / 1000
    await alice.receive(wait=0.5)
    await alice.receive(wait=0.2)
    assert one_time_keys_left(server, bob.core.device_id) == after_one  # not again this hour
    for c in (alice, bob, mallory):
        await c.close()


async def test_finding6_curve25519_key_is_unique_server_wide(
    server: ServerProcess, tmp_path: Path
) -> None:
    bob = await register(server, tmp_path / "bob")
    (licence,) = server.licences(1)
    core = stray_core(tmp_path, "mallory")
    mallory_keys = core.device_keys()
    # Mallory's own Ed25519 key, self-signing Bob's Curve25519 key as her own.
    from kluis.protocol import signing

    curve = bob.core.device_keys().curve25519
    sig = core._account.sign(
        signing.device_keys_message(mallory_keys.ed25519, curve, mallory_keys.seal)
    )
    keys = f.DeviceKeys(mallory_keys.ed25519, curve, mallory_keys.seal, sig)
    identity = AccountKey()
    raw = await RawConnection.open(server)
    register_frame = f.Register(
        rid=1,
        licence=licence,
        identity=identity.public,
        device=certify(identity, account_id_for(identity.public), keys),
        sig=core._account.sign(signing.challenge_message(raw.nonce, keys.ed25519, raw.server)),
    )
    await raw.send(f.encode(register_frame))
    answer = await raw.recv()
    assert isinstance(answer, f.Error) and answer.code == "bad_signature"
    await raw.close()
    core.store.close()
    await bob.close()


def test_finding6_a_message_reused_under_a_copied_curve_key_is_refused(tmp_path: Path) -> None:
    """The server-side uniqueness check above is a rule of an honest server. Against a hostile
    one: Mallory lists a device with Bob's Curve25519 key; Alice writes to Mallory (in fact to
    Bob's key); Mallory reseals that Olm message to Bob. c4b3566 showed it to Bob as Alice
    writing to him; now the payload names its recipient device and conversation."""
    from tests.test_core import bundle, make_core, record, show

    alice = make_core(tmp_path, "alice")
    bob = make_core(tmp_path, "bob")
    mallory = make_core(tmp_path, "mallory")
    show(bob, alice, record(alice))
    bob_keys = bob.device_keys()
    from kluis.protocol import signing

    mallory_seal = mallory.device_keys().seal
    sig = mallory._account.sign(
        signing.device_keys_message(mallory.device_id, bob_keys.curve25519, mallory_seal)
    )
    copied = f.DeviceKeys(mallory.device_id, bob_keys.curve25519, mallory_seal, sig)
    mallory_record = certify(mallory._account_key, mallory.account_id, copied)  # type: ignore[arg-type]
    show(alice, mallory, mallory_record)
    bob_key = bundle(bob).one_time_key  # Bob's published key, re-signed by Mallory's device
    resigned = f.SignedKey(
        key_id=bob_key.key_id,
        key=bob_key.key,
        sig=mallory._account.sign(
            signing.one_time_key_message(mallory.device_id, bob_key.key_id, bob_key.key)
        ),
    )
    alice.add_bundles(
        mallory.account_id,
        [f.Bundle(device=mallory_record, one_time_key=resigned, fallback=False)],
    )
    (env,) = alice.encrypt(mallory.account_id, alice.new_text(mallory.account_id, "for mallory"))
    opened = mallory.open_envelope(f.InEnvelope(id=1, body=env.body))
    assert opened is not None
    resealed = forged_envelope(bob_keys, opened.sealed)
    again = bob.open_envelope(f.InEnvelope(id=1, body=resealed.body))
    assert again is not None
    with pytest.raises(UntrustedDevice, match="another device"):
        bob.decrypt(again)
    assert bob.history() == []


async def test_finding15_login_is_bound_to_the_server_origin(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = await register(server, tmp_path / "alice")
    raw = await RawConnection.open(server)
    elsewhere = alice.core.sign_challenge(raw.nonce, "http://relay.example:80")
    await raw.send(f.encode(f.Auth(rid=1, device=alice.core.device_id, sig=elsewhere)))
    answer = await raw.recv()
    assert isinstance(answer, f.Error)
    await raw.close()
    # A client that dialled another name than the server gives itself refuses to sign.
    await alice.close()
    other = KluisClient.open(tmp_path / "alice", PASSPHRASE)
    other.core._identity.server = f"http://localhost:{server.port}"
    with pytest.raises(TransportError, match="calls itself"):
        await other.connect()
    await other.close()


async def test_finding15_profile_keeps_no_session_times_in_plaintext(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    server = inproc  # joined in memory: this test needs no socket
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    await alice.send(bob.account_id, "one")
    await asyncio.sleep(0.05)
    await bob.receive(wait=5, until=1)
    await bob.send(alice.account_id, "two")
    await alice.receive(wait=5, until=1)
    for c in (alice, bob):
        await c.close()
        assert isinstance(c.core.store, ProfileStore)
        db = sqlite3.connect(c.core.store.path / "profile.sqlite3")
        used = [r[0] for r in db.execute("SELECT used FROM sessions")]
        db.close()
        assert used and set(used) == {0}


async def test_a_linking_device_refuses_an_account_it_did_not_ask_for(
    inproc: InProcessServer, tmp_path: Path
) -> None:
    server = inproc  # joined in memory: this test needs no socket
    """A server that knows a link code can have its own account approve the new device; with
    ``device request --account ID`` the device refuses to be anyone else's."""
    from kluis.errors import LocalProtocolError

    alice = await register(server, tmp_path / "alice")
    mallory = await register(server, tmp_path / "mallory")
    code = await KluisClient.request_link(
        server.url,
        tmp_path / "laptop",
        PASSPHRASE,
        account=alice.account_id,
        transport_factory=transport_factory(server),
        kdf=fast_kdf(),
    )
    await mallory.approve(code)  # the code reached the wrong account
    laptop = open_profile(server, tmp_path / "laptop")
    with pytest.raises(LocalProtocolError, match="different account"):
        await laptop.connect()
    await laptop.close()
    await alice.close()
    await mallory.close()
