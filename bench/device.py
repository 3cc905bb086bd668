"""A simulated Kluis device for ``--no-crypto`` runs: the real protocol, opaque message bodies.

Theory of operation: each device has real keys (Ed25519 from ``cryptography``, X25519 for its
Curve25519 and sealing keys, self-signed exactly as ``protocol/signing.py`` says), logs in by
signing the server's challenge, and speaks the wire frames of ``protocol/frames.py`` over one
picows WebSocket. It skips only the client-side encryption: bodies are opaque bytes that carry the
send timestamp, so the receiver can measure end-to-end latency. Receivers acknowledge every
``Deliver`` at once, so the server deletes what it delivered (durable semantics stay on).
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from kluis.crypto.account_key import AccountKey
from kluis.identity.chain import account_id_for, certify
from kluis.protocol import frames as f
from kluis.protocol import signing

_RAW = serialization.Encoding.Raw
_PUB = serialization.PublicFormat.Raw
BODY_BYTES = 100
_STAMP = struct.Struct("<dI")  # perf_counter at send (CLOCK_MONOTONIC: shared by processes), seq


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def body(t0: float, seq: int, size: int = BODY_BYTES) -> bytes:
    head = _STAMP.pack(t0, seq)
    return head + b"\x00" * max(0, size - len(head))


def stamp(data: bytes) -> tuple[float, int]:
    t0, seq = _STAMP.unpack_from(data)
    return t0, seq


class Keys:
    __slots__ = ("account", "device_keys", "ed25519", "identity", "record", "signer")

    def __init__(self) -> None:
        self.signer = Ed25519PrivateKey.generate()
        self.ed25519 = b64(self.signer.public_key().public_bytes(_RAW, _PUB))
        curve = b64(X25519PrivateKey.generate().public_key().public_bytes(_RAW, _PUB))
        seal = b64(X25519PrivateKey.generate().public_key().public_bytes(_RAW, _PUB))
        sig = self.sign(signing.device_keys_message(self.ed25519, curve, seal))
        self.device_keys = f.DeviceKeys(ed25519=self.ed25519, curve25519=curve, seal=seal, sig=sig)
        # Each bench device is the first device of its own account: it holds the identity.
        self.identity = AccountKey()
        self.account = account_id_for(self.identity.public)
        self.record = certify(self.identity, self.account, self.device_keys)

    def sign(self, message: bytes) -> str:
        return b64(self.signer.sign(message))


DeliverHandler = Callable[["Device", list[f.InEnvelope], float], None]


class Device(WSListener):
    """One connection of one simulated device. Requests are answered through futures by rid."""

    def __init__(self, keys: Keys | None = None, on_deliver: DeliverHandler | None = None) -> None:
        self.keys = keys or Keys()
        self.server_origin = ""
        self.account = ""
        self.on_deliver = on_deliver
        self.transport: WSTransport | None = None
        self.errors: dict[str, int] = {}
        self.received = 0
        self._rid = 0
        self._waiters: dict[int, asyncio.Future[f.ServerFrame]] = {}
        self._ignored: set[int] = set()  # fire-and-forget requests (acks)
        self._loop = loop = asyncio.get_running_loop()  # get_running_loop() costs a getpid()
        self._challenge: asyncio.Future[bytes] = loop.create_future()
        self.synced: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    @property
    def device_id(self) -> str:
        return self.keys.ed25519

    # ---- picows callbacks -------------------------------------------------------------------

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.BINARY:
            self._on_frame(f.decode_server_frame(frame.get_payload_as_bytes()))
        elif kind == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        exc = ConnectionError("connection closed")
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(exc)
        self._waiters.clear()
        for fut2 in (self._challenge, self.synced):
            if not fut2.done():
                fut2.set_exception(exc)
                fut2.exception()  # mark retrieved
        if not self.closed.done():
            self.closed.set_result(None)

    def _on_frame(self, frame: f.ServerFrame) -> None:
        if isinstance(frame, f.Deliver):
            now = time.perf_counter()
            self.received += len(frame.envelopes)
            self.send_nowait(f.Ack(rid=0, ids=[e.id for e in frame.envelopes]))
            if self.on_deliver is not None:
                self.on_deliver(self, frame.envelopes, now)
            return
        if isinstance(frame, f.Challenge):
            self.server_origin = frame.server
            self._challenge.set_result(frame.nonce)
            return
        if isinstance(frame, f.Synced):
            if not self.synced.done():
                self.synced.set_result(None)
            return
        if isinstance(frame, f.KeysLow):
            return
        rid = getattr(frame, "rid", None)
        if isinstance(frame, f.Error):
            self.errors[frame.code] = self.errors.get(frame.code, 0) + 1
        if rid is None:
            return
        if rid in self._ignored:
            self._ignored.discard(rid)
            return
        fut = self._waiters.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result(frame)

    # ---- requests ---------------------------------------------------------------------------

    def _next_rid(self) -> int:
        self._rid += 1
        return self._rid

    def _write(self, frame: Any) -> None:
        if self.transport is None or self.transport.is_disconnected:
            raise ConnectionError("not connected")
        self.transport.send(WSMsgType.BINARY, f.encode(frame))

    async def request(self, frame: Any) -> f.ServerFrame:
        rid = self._next_rid()
        frame = frame.__class__(**{**_fields(frame), "rid": rid})
        fut: asyncio.Future[f.ServerFrame] = self._loop.create_future()
        self._waiters[rid] = fut
        self._write(frame)
        return await fut

    def send_nowait(self, frame: Any) -> None:
        rid = self._next_rid()
        self._ignored.add(rid)
        self._write(frame.__class__(**{**_fields(frame), "rid": rid}))

    async def send(self, account: str, device: str, data: bytes) -> f.ServerFrame:
        rid = self._next_rid()
        fut: asyncio.Future[f.ServerFrame] = self._loop.create_future()
        self._waiters[rid] = fut
        self._write(f.Send.one(rid, account, [f.OutEnvelope(device=device, body=data)]))
        return await fut

    # ---- log-in -----------------------------------------------------------------------------

    async def connect(self, url: str, local_addr: tuple[str, int] | None = None) -> bytes:
        host = url.split("//", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
        if not host.startswith("127."):
            raise ValueError(f"the load generator only targets 127.0.0.0/8, not {host!r}")
        kwargs: dict[str, Any] = {"websocket_handshake_timeout": 20}
        if local_addr is not None:
            kwargs["local_addr"] = local_addr
        self.transport, _ = await ws_connect(lambda: self, url, **kwargs)
        return await asyncio.wait_for(self._challenge, 20)

    async def register(
        self, url: str, licence: str, local_addr: tuple[str, int] | None = None
    ) -> None:
        nonce = await self.connect(url, local_addr)
        sig = self.keys.sign(signing.challenge_message(nonce, self.device_id, self.server_origin))
        register = f.Register(
            rid=0,
            licence=licence,
            identity=self.keys.identity.public,
            device=self.keys.record,
            sig=sig,
        )
        reply = await asyncio.wait_for(self.request(register), 30)
        if not isinstance(reply, f.Welcome):
            raise RuntimeError(f"register refused: {reply}")
        self.account = reply.account

    async def auth(self, url: str, local_addr: tuple[str, int] | None = None) -> None:
        nonce = await self.connect(url, local_addr)
        sig = self.keys.sign(signing.challenge_message(nonce, self.device_id, self.server_origin))
        reply = await asyncio.wait_for(
            self.request(f.Auth(rid=0, device=self.device_id, sig=sig)), 30
        )
        if not isinstance(reply, f.Welcome):
            raise RuntimeError(f"auth refused: {reply}")
        self.account = reply.account

    async def close(self) -> None:
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.send_close()
            self.transport.disconnect()
            await asyncio.wait_for(self.transport.wait_disconnected(), 5)
        self.transport = None


def _fields(frame: Any) -> dict[str, Any]:
    return {name: getattr(frame, name) for name in frame.__struct_fields__}
