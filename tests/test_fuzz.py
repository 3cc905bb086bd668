"""Hypothesis against every decoder of untrusted input: each answers with a typed error, never a crash.

Covered: client and server frames (schema-shaped garbage, not only random bytes), the server's
request handler in-process (unauthenticated and authenticated), sealed boxes, the ``Sealed`` and
``Payload`` records inside them (through a real Olm session), Olm messages with any type, key
bundles and device records on both sides, and the profile's ``profile.json``.

The budget is small in the suite; ``make fuzz`` runs the same properties with
``KLUIS_FUZZ_EXAMPLES`` (default there: 5,000 each).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kluis.client.core import ClientCore, Opened, Sealed
from kluis.client.store import ProfileStore
from kluis.crypto import padding, seal
from kluis.crypto.olm import OlmSession
from kluis.crypto.profile_key import new_params
from kluis.errors import (
    CryptoError,
    DecryptionError,
    KluisError,
    LocalProtocolError,
    MalformedFrame,
)
from kluis.identity.chain import check_device_keys
from kluis.protocol import frames as f
from kluis.server.app import Server, open_server
from kluis.server.config import ServerConfig
from kluis.server.connection import Connection
from kluis.server.keys import check_signed_key

EXAMPLES = int(os.environ.get("KLUIS_FUZZ_EXAMPLES", "60"))
BUDGET = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---- strategies -------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=70)
    | st.binary(max_size=70)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
b64key = st.text(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", min_size=1, max_size=90
)
# A string that encode() turns into bytes that are not UTF-8 (msgspec then raises
# UnicodeDecodeError, which once escaped every decoder): see pack().
NOT_UTF8 = "\x00not-utf8"
field_value = values | b64key | st.integers(0, 2**53) | st.just(NOT_UTF8)


def pack(obj: Any) -> bytes:
    """msgpack, with every NOT_UTF8 string's bytes replaced by invalid UTF-8 of equal length."""
    return msgspec.msgpack.encode(obj).replace(NOT_UTF8.encode(), b"\xff\xfe" * 5)


def frame_dicts(classes: tuple[type[Any], ...]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts shaped like frames: a real tag, real field names, any values (often the right type)."""

    def for_class(cls: type[Any]) -> st.SearchStrategy[dict[str, Any]]:
        names = [fl.name for fl in msgspec.structs.fields(cls)]
        tag = cls.__struct_config__.tag
        return st.fixed_dictionaries(
            {"t": st.sampled_from([tag, NOT_UTF8])},
            optional={n: field_value for n in names} | {"zz": values},
        )

    return st.one_of([for_class(c) for c in classes])


CLIENT_FRAMES = (
    f.Register,
    f.Auth,
    f.LinkRequest,
    f.LinkFetch,
    f.LinkApprove,
    f.UploadKeys,
    f.ListDevices,
    f.ClaimKeys,
    f.Send,
    f.Ack,
    f.Revoke,
)
SERVER_FRAMES = (
    f.Challenge,
    f.Welcome,
    f.LinkPending,
    f.LinkInfo,
    f.KeyCount,
    f.Devices,
    f.Bundles,
    f.Done,
    f.Error,
    f.Deliver,
    f.KeysLow,
    f.Synced,
)


def signed_keys(core: ClientCore) -> st.SearchStrategy[f.SignedKey]:
    """Signed keys: real ones, real ones with a field swapped for garbage, or garbage."""
    otks, _ = core.keys_to_upload(0)
    real = st.sampled_from(otks)
    return real | st.builds(
        lambda k, which, junk: msgspec.structs.replace(k, **{which: junk}),
        real,
        st.sampled_from(["key_id", "key", "sig"]),
        b64key,
    )


# ---- fixtures: two client cores, and a server state in this process ----------------------------


def make_core(path: Path, *, registered: bool = True) -> ClientCore:
    store = ProfileStore.create(path, "pw", new_params(time_cost=1, memory_kib=8192))
    core = ClientCore.create(
        store, "http://unused", clock=time.time, random=secrets.token_bytes, new_account=True
    )
    if registered:
        core.set_account(core.new_account_id())
    return core


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ClientCore, ClientCore]]:
    base = tmp_path_factory.mktemp("fuzz-cores")
    alice, bob = make_core(base / "alice"), make_core(base / "bob")
    otks, _ = bob.keys_to_upload(0)
    bob.keys_published()
    alice.accept_devices(bob.account_id, bob.identity_key, [bob.own_record()], [])
    bob.accept_devices(alice.account_id, alice.identity_key, [alice.own_record()], [])
    bundle = f.Bundle(device=bob.own_record(), one_time_key=otks[0], fallback=False)
    alice.add_bundles(bob.account_id, [bundle])
    # One real message, so that Bob holds an inbound session: garbage then reaches Olm itself.
    (env,) = alice.encrypt(bob.account_id, alice.new_text(bob.account_id, "hello"))
    opened = bob.open_envelope(f.InEnvelope(id=1, body=env.body))
    assert opened is not None and bob.decrypt(opened) is not None
    yield alice, bob
    alice.store.close()
    bob.store.close()


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, loop: asyncio.AbstractEventLoop
) -> Iterator[tuple[Server, Connection, ClientCore]]:
    """A server state with one registered device, and that device's authenticated connection."""
    base = tmp_path_factory.mktemp("fuzz-server")
    state = open_server(ServerConfig(data_dir=base / "data"))
    (licence,) = loop.run_until_complete(state.services.accounts.create_licences(1, 30))
    device = make_core(base / "device", registered=False)
    conn = Connection(state.services, lambda: None)
    frame = f.Register(
        rid=1,
        licence=licence,
        identity=device.identity_key,
        device=device.own_record(),
        sig=device.sign_challenge(conn.nonce, state.services.origin),
    )
    welcome = f.decode_server_frame(loop.run_until_complete(conn.handle(f.encode(frame))))
    assert isinstance(welcome, f.Welcome), welcome
    device.set_account(welcome.account)
    yield state, conn, device
    device.store.close()
    loop.run_until_complete(state.store.close())


# ---- frames -----------------------------------------------------------------------------------


@BUDGET
@given(frame_dicts(CLIENT_FRAMES) | values)
def test_client_frame_decoder_takes_schema_shaped_garbage(obj: Any) -> None:
    data = pack(obj)
    try:
        frame = f.decode_client_frame(data)
    except MalformedFrame:
        return
    assert f.decode_client_frame(f.encode(frame)) == frame  # what decodes, re-encodes


@BUDGET
@given(frame_dicts(SERVER_FRAMES) | values)
def test_server_frame_decoder_takes_schema_shaped_garbage(obj: Any) -> None:
    data = pack(obj)
    try:
        frame = f.decode_server_frame(data)
    except MalformedFrame:
        return
    assert f.decode_server_frame(f.encode(frame)) == frame


def _answer(loop: asyncio.AbstractEventLoop, conn: Connection, data: bytes) -> f.ServerFrame:
    reply = f.decode_server_frame(loop.run_until_complete(conn.handle(data)))
    if isinstance(reply, f.Error):
        # "internal" means an exception the handler did not expect: a bug, whatever the input.
        assert reply.code != "internal", reply
    return reply


@BUDGET
@given(st.binary(max_size=300) | frame_dicts(CLIENT_FRAMES).map(pack))
def test_server_handler_unauthenticated(
    server: tuple[Server, Connection, ClientCore], loop: asyncio.AbstractEventLoop, data: bytes
) -> None:
    state, _, _ = server
    conn = Connection(state.services, lambda: None)
    reply = _answer(loop, conn, data)
    assert isinstance(reply, f.Error | f.LinkPending)  # a valid signature cannot be guessed
    conn.closed()


@BUDGET
@given(frame_dicts(CLIENT_FRAMES[3:]))
def test_server_handler_authenticated(
    server: tuple[Server, Connection, ClientCore],
    loop: asyncio.AbstractEventLoop,
    obj: dict[str, Any],
) -> None:
    _state, conn, device = server
    # Aim some requests at real accounts and devices, so they get past the lookups.
    for name in ("account", "device"):
        if name in obj and isinstance(obj[name], bool):
            obj[name] = device.account_id if name == "account" else device.device_id
    _answer(loop, conn, pack(obj))


@BUDGET
@given(st.data())
def test_server_checks_uploaded_keys(
    server: tuple[Server, Connection, ClientCore], data: st.DataObject
) -> None:
    _, _, device = server
    key = data.draw(signed_keys(device))
    with contextlib.suppress(KluisError):
        check_signed_key(device.device_id, key)
    keys = device.device_keys()
    which = data.draw(st.sampled_from(["ed25519", "curve25519", "seal", "sig"]))
    with contextlib.suppress(KluisError):
        check_device_keys(msgspec.structs.replace(keys, **{which: data.draw(b64key)}))


# ---- sealed boxes, and what is inside them ----------------------------------------------------


@BUDGET
@given(st.binary(max_size=200) | st.binary(max_size=200).map(lambda b: seal.VERSION + b))
def test_unsealing_garbage_is_a_decryption_error(
    pair: tuple[ClientCore, ClientCore], body: bytes
) -> None:
    _, bob = pair
    with pytest.raises(CryptoError):
        bob.open_envelope(f.InEnvelope(id=1, body=body))


@BUDGET
@given(st.binary(max_size=200) | values.map(pack) | frame_dicts((Sealed,)).map(pack))
def test_sealed_garbage_for_the_right_key_is_a_decryption_error(
    pair: tuple[ClientCore, ClientCore], inner: bytes
) -> None:
    _, bob = pair
    keys = bob.device_keys()
    box = seal.seal(keys.seal, inner, keys.ed25519.encode())
    try:
        opened = bob.open_envelope(f.InEnvelope(id=1, body=box))
    except CryptoError:
        return
    assert opened is not None
    with pytest.raises(KluisError):  # an unknown device, or Olm refuses the body
        bob.decrypt(opened)


@BUDGET
@given(st.integers(min_value=-(2**70), max_value=2**70), st.binary(max_size=300))
def test_any_olm_type_and_body_from_a_known_device(
    pair: tuple[ClientCore, ClientCore], msg_type: int, body: bytes
) -> None:
    alice, bob = pair
    sealed = Sealed(
        account=alice.account_id,
        device=alice.device_id,
        curve=alice.device_keys().curve25519,
        type=msg_type,
        body=body,
    )
    with pytest.raises(CryptoError):
        bob.decrypt(Opened(f.InEnvelope(id=1, body=body), sealed))


@BUDGET
@given(
    st.binary(max_size=300)
    | values.map(msgspec.msgpack.encode).map(padding.pad)
    | frame_dicts(
        (msgspec.defstruct("P", [("id", bytes), ("ts", int), ("kind", str), ("text", str)]),)
    ).map(lambda d: padding.pad(pack(d)))
)
def test_olm_plaintext_of_any_shape(pair: tuple[ClientCore, ClientCore], plaintext: bytes) -> None:
    """A peer with a real session sends a plaintext that is not a valid padded Payload."""
    alice, bob = pair
    peer = f"{bob.account_id}/{bob.device_id}"  # sessions are kept per account and device
    row_id, pickled = alice.store.sessions(peer)[0]
    session = OlmSession.from_pickle(pickled.decode(), alice.store.pickle_key)
    msg_type, body = session.encrypt(plaintext)
    alice.store.save_session(row_id, peer, session.pickle(alice.store.pickle_key).encode(), 0)
    sealed = Sealed(
        account=alice.account_id,
        device=alice.device_id,
        curve=alice.device_keys().curve25519,
        type=msg_type,
        body=body,
    )
    envelope = f.InEnvelope(id=1, body=os.urandom(32))
    try:
        message = bob.decrypt(Opened(envelope, sealed))
    except KluisError:
        return
    assert message is None or isinstance(message.text, str)


@BUDGET
@given(st.binary(max_size=300))
def test_unpad_is_total(data: bytes) -> None:
    with contextlib.suppress(CryptoError):
        assert padding.pad(padding.unpad(data)).startswith(padding.unpad(data))


# ---- key bundles and device lists as the client receives them ---------------------------------


@BUDGET
@given(st.data())
def test_client_checks_bundles_and_device_lists(
    pair: tuple[ClientCore, ClientCore], data: st.DataObject
) -> None:
    alice, bob = pair
    record = bob.own_record()
    which = data.draw(st.sampled_from(["ed25519", "curve25519", "seal", "sig", "cert"]))
    if which == "cert":
        forged = f.DeviceRecord(keys=record.keys, cert=data.draw(b64key))
    else:
        keys = msgspec.structs.replace(record.keys, **{which: data.draw(b64key)})
        forged = f.DeviceRecord(keys=keys, cert=record.cert)
    assume(forged != record)
    # A device list with changed keys or certificate: that device is refused, never used.
    view = alice.accept_devices(bob.account_id, bob.identity_key, [forged], [])
    assert not view.trusted and view.untrusted
    with pytest.raises(KluisError):
        alice.devices_for_sending(bob.account_id)
    alice.accept_devices(bob.account_id, bob.identity_key, [record], [])  # back to the truth
    key = data.draw(signed_keys(bob))
    bundle = f.Bundle(
        device=data.draw(st.sampled_from([record, forged])), one_time_key=key, fallback=False
    )
    with contextlib.suppress(KluisError):
        alice.add_bundles(bob.account_id, [bundle])


# ---- profile.json -----------------------------------------------------------------------------


@BUDGET
@given(
    st.binary(max_size=200)
    | st.fixed_dictionaries(
        {
            "kdf": st.fixed_dictionaries(
                {"salt": st.text(max_size=30) | st.just("AAAAAAAAAAAAAAAAAAAAAA==")},
                # In range only small (fast) values; else far out of range either way.
                optional={
                    "time_cost": st.integers(-5, 2) | st.integers(2**33, 2**70),
                    "memory_kib": st.integers(-5, 8200) | st.integers(2**33, 2**70),
                    "parallelism": st.integers(-5, 20) | st.integers(2**33, 2**70),
                },
            )
            | values,
            "verifier": st.text(max_size=30),
        }
    ).map(msgspec.json.encode)
)
def test_damaged_profile_meta_is_a_typed_error(
    tmp_path_factory: pytest.TempPathFactory, raw: bytes
) -> None:
    path = tmp_path_factory.mktemp("meta")
    (path / ProfileStore.META).write_bytes(raw)
    with pytest.raises(KluisError):
        ProfileStore.open(path, "pw").close()


# ---- regressions found by the properties above ------------------------------------------------


@pytest.mark.parametrize("msg_type", [-1, 2**64, 2**70])
def test_regression_olm_type_out_of_range_is_a_decryption_error(
    pair: tuple[ClientCore, ClientCore], msg_type: int
) -> None:
    """Was OverflowError out of vodozemac: one crafted envelope from any peer the recipient
    knows broke ``receive()``; unacknowledged, it came back on every connection."""
    alice, bob = pair
    sealed = Sealed(
        account=alice.account_id,
        device=alice.device_id,
        curve=alice.device_keys().curve25519,
        type=msg_type,
        body=b"x",
    )
    with pytest.raises(DecryptionError):
        bob.decrypt(Opened(f.InEnvelope(id=1, body=b"x"), sealed))


@pytest.mark.parametrize(
    "kdf",
    [
        {"salt": "AAAA"},  # argon2: salt is too short
        {"salt": "AAAAAAAAAAAAAAAAAAAAAA==", "time_cost": -1},  # OverflowError in argon2-cffi
        {"salt": "AAAAAAAAAAAAAAAAAAAAAA==", "time_cost": 2**40},  # would run for ages
    ],
)
def test_regression_damaged_kdf_parameters(tmp_path: Path, kdf: dict[str, Any]) -> None:
    (tmp_path / ProfileStore.META).write_bytes(msgspec.json.encode({"kdf": kdf, "verifier": ""}))
    with pytest.raises(LocalProtocolError):
        ProfileStore.open(tmp_path, "pw")


@pytest.mark.parametrize(
    "data",
    [b"\x81\xa1t\xa2\xff\xfe", b"\x83\xa1t\xa4auth\xa3rid\x01\xa6device\xa2\xff\xfe"],
)
def test_regression_frame_that_is_not_utf8_is_bad_frame(data: bytes) -> None:
    """Was UnicodeDecodeError: the server answered 'internal' and logged a traceback per frame,
    for anyone, unauthenticated; a client's reader task died on such a server frame."""
    with pytest.raises(MalformedFrame):
        f.decode_client_frame(data)
    with pytest.raises(MalformedFrame):
        f.decode_server_frame(data)


def test_regression_sealed_record_that_is_not_utf8(pair: tuple[ClientCore, ClientCore]) -> None:
    """Was UnicodeDecodeError out of open_envelope: one envelope wedged the recipient's inbox."""
    _, bob = pair
    keys = bob.device_keys()
    inner = pack({"account": NOT_UTF8, "device": "d", "type": 0, "body": b""})
    box = seal.seal(keys.seal, inner, keys.ed25519.encode())
    with pytest.raises(DecryptionError):
        bob.open_envelope(f.InEnvelope(id=1, body=box))
