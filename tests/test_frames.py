"""Wire frames decode once, at the edge, into typed structs or a typed error."""

from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kluis.crypto import padding
from kluis.errors import DecryptionError, MalformedFrame, MismatchedDevices, error_for_code
from kluis.protocol import frames as f


def test_round_trip() -> None:
    frame = f.Send.one(3, "a" * 16, [f.OutEnvelope(device="d", body=b"\x00\x01")])
    assert f.decode_client_frame(f.encode(frame)) == frame
    err = f.Error(rid=None, code="bad_frame", message="no")
    assert f.decode_server_frame(f.encode(err)) == err


def test_server_frames_are_not_client_frames() -> None:
    with pytest.raises(MalformedFrame):
        f.decode_client_frame(f.encode(f.Done(rid=1)))


@pytest.mark.parametrize(
    "obj",
    [
        {"t": "send", "rid": -1, "account": "a", "envelopes": []},
        {"t": "send", "rid": 1, "account": "", "envelopes": []},
        {"t": "auth", "rid": 1, "device": "d", "sig": "s", "extra": 1},
        {"t": "ack", "rid": 1, "ids": ["x"]},
        [1, 2, 3],
    ],
)
def test_schema_violations(obj: object) -> None:
    with pytest.raises(MalformedFrame):
        f.decode_client_frame(msgspec.msgpack.encode(obj))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_crash_the_decoders(data: bytes) -> None:
    for decode in (f.decode_client_frame, f.decode_server_frame):
        with contextlib.suppress(MalformedFrame):  # the only exception allowed out
            decode(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000))
def test_padding_round_trip_and_hides_length(data: bytes) -> None:
    padded = padding.pad(data)
    assert padding.unpad(padded) == data
    assert len(padded) in (64, 256, 1024, 4096, 16384, 65536)


def test_bad_padding() -> None:
    with pytest.raises(DecryptionError):
        padding.unpad(b"\x00" * 64)


def test_error_codes_map_back_to_types() -> None:
    err = error_for_code("mismatched_devices", "m")
    assert isinstance(err, MismatchedDevices) and err.mismatched == []
    assert error_for_code("something_new", "m").code == "remote_protocol"
