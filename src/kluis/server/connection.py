"""One client connection: authentication state and the handler for each request frame.

Theory of operation: a connection starts in ``AWAITING_AUTH`` holding a fresh random nonce (sent
as the ``Challenge``). ``Register`` or ``Auth`` with a valid signature moves it to
``AUTHENTICATED``; ``LinkRequest`` moves it to ``LINK_PENDING`` (a new device waiting for its
approval, which may only wait). Every other request needs ``AUTHENTICATED``. Each request gets
exactly one answer frame; a refused request changes nothing and leaves the connection usable.

The transport (``server/app.py``) owns the socket: it feeds raw frames to :meth:`handle` and
writes what :meth:`handle` returns and what :meth:`take_outgoing` yields (pushes).
"""

from __future__ import annotations

import enum
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from kluis.errors import (
    FrameTooLarge,
    KluisError,
    MalformedFrame,
    MismatchedDevices,
    RateLimited,
    ServerError,
    Unauthenticated,
)
from kluis.protocol import frames as f
from kluis.server.ratelimit import TokenBucket

if TYPE_CHECKING:
    from kluis.server.app import ServerState

log = logging.getLogger("kluis.server")


class State(enum.Enum):
    AWAITING_AUTH = "awaiting_auth"
    LINK_PENDING = "link_pending"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"


_LOGIN: frozenset[type] = frozenset({f.Register, f.Auth, f.LinkRequest})
_SESSION: frozenset[type] = frozenset(
    {f.Send, f.Ack, f.UploadKeys, f.ListDevices, f.ClaimKeys, f.LinkFetch, f.LinkApprove, f.Revoke}
)

# The state machine as data: the requests each state accepts. Login requests move
# AWAITING_AUTH to AUTHENTICATED (Register, Auth) or LINK_PENDING (LinkRequest); nothing else
# changes the state. A request a state does not accept is refused and changes nothing.
ACCEPTS: dict[State, frozenset[type]] = {
    State.AWAITING_AUTH: _LOGIN,
    State.LINK_PENDING: frozenset(),
    State.AUTHENTICATED: _SESSION,
    State.CLOSED: frozenset(),
}
REFUSALS: dict[State, str] = {
    State.AWAITING_AUTH: "sign the challenge first (auth or register)",
    State.LINK_PENDING: "this device waits for approval; reconnect once approved",
    State.AUTHENTICATED: "already logged in on this connection",
    State.CLOSED: "connection closed",
}


class Connection:
    """Implements the mailbox's Recipient protocol: pushes queue up in ``outgoing``."""

    def __init__(self, server: ServerState, wake: Callable[[], None]) -> None:
        self.server = server
        self.state = State.AWAITING_AUTH
        self.nonce = secrets.token_bytes(32)
        self.account_id = ""
        self.device_id = ""
        self.delivered_upto = 0
        self._wake = wake  # tells the transport that pushes are waiting
        self._outgoing: list[f.InEnvelope] = []
        self._notices: list[f.ServerFrame] = []
        limits, clock = server.config.limits, server.clock
        self._send_bucket = TokenBucket(limits.send_rate_per_s, limits.send_burst, clock)
        self._claim_bucket = TokenBucket(limits.claim_rate_per_s, limits.claim_burst, clock)
        self.close_requested = False

    # ---- pushes -----------------------------------------------------------------------------

    def push(self, envelope_id: int, body: bytes) -> None:
        if envelope_id <= self.delivered_upto:
            return  # already sent in the backlog read
        self.delivered_upto = envelope_id
        if not self._outgoing and not self._notices:
            self._wake()
        self._outgoing.append(f.InEnvelope(id=envelope_id, body=body))

    def notify(self, frame: f.ServerFrame) -> None:
        if not self._outgoing and not self._notices:
            self._wake()
        self._notices.append(frame)

    def take_outgoing(self) -> list[bytes]:
        batch = self.server.config.limits.push_batch
        pending, self._outgoing = self._outgoing, []
        out = [
            f.encode(f.Deliver(envelopes=pending[i : i + batch]))
            for i in range(0, len(pending), batch)
        ]
        out.extend(f.encode(n) for n in self._notices)  # after envelopes: Synced follows backlog
        self._notices = []
        return out

    def revoke(self) -> None:
        self.close_requested = True
        self._wake()

    def closed(self) -> None:
        if self.state is State.AUTHENTICATED:
            self.server.mailbox.detach(self.device_id, self)
            if self.server.connections.get(self.device_id) is self:  # not a newer connection
                del self.server.connections[self.device_id]
        self.state = State.CLOSED

    # ---- requests ---------------------------------------------------------------------------

    async def handle(self, data: bytes) -> bytes:
        """Answer one request frame; never raises for anything the client sent."""
        rid: int | None = None
        try:
            if len(data) > self.server.config.limits.max_frame_bytes:
                raise FrameTooLarge(
                    f"frame of {len(data)} bytes exceeds {self.server.config.limits.max_frame_bytes}"
                )
            frame = f.decode_client_frame(data)
            rid = frame.rid
            reply = await self._dispatch(frame)
        except MismatchedDevices as exc:
            missing = exc.details.get("missing", [])
            extra = exc.details.get("extra", [])
            assert isinstance(missing, list) and isinstance(extra, list)
            reply = f.Error(
                rid=rid, code=exc.code, message=exc.message, missing=missing, extra=extra
            )
        except KluisError as exc:
            reply = f.Error(rid=rid, code=exc.code, message=exc.message)
        except Exception:
            log.exception("request failed")  # never logs frame contents
            err = ServerError("the server failed; nothing was changed")
            reply = f.Error(rid=rid, code=err.code, message=err.message)
        return f.encode(reply)

    async def _dispatch(self, frame: f.ClientFrame) -> f.ServerFrame:
        if type(frame) not in ACCEPTS[self.state]:
            raise Unauthenticated(REFUSALS[self.state])
        match frame:
            case f.Register() | f.Auth() | f.LinkRequest():
                return self._login(frame)
            case f.Send():
                return await self._send(frame)
            case f.Ack():
                await self.server.mailbox.acknowledge(self.device_id, frame.ids)
                return f.Done(rid=frame.rid)
            case f.UploadKeys():
                count = self.server.keys.upload(
                    self.device_id, frame.one_time_keys, frame.fallback_key
                )
                return f.KeyCount(rid=frame.rid, otk_count=count)
            case f.ListDevices():
                identity, devices, revoked = self.server.accounts.devices(frame.account)
                return f.Devices(
                    rid=frame.rid,
                    account=frame.account,
                    identity=identity,
                    devices=devices,
                    revoked=revoked,
                )
            case f.ClaimKeys():
                return self._claim(frame)
            case f.LinkFetch():
                return f.LinkInfo(rid=frame.rid, device=self.server.accounts.link_keys(frame.token))
            case f.LinkApprove():
                self.server.accounts.approve_link(self.account_id, frame.token, frame.device)
                return f.Done(rid=frame.rid)
            case f.Revoke():
                return self._revoke(frame)
        raise MalformedFrame("unexpected frame")  # pragma: no cover - exhaustive above

    def _login(self, frame: f.Register | f.Auth | f.LinkRequest) -> f.ServerFrame:
        accounts = self.server.accounts
        if isinstance(frame, f.LinkRequest):
            link = f.PendingLink(
                device=frame.device,
                one_time_keys=frame.one_time_keys,
                fallback_key=frame.fallback_key,
            )
            token, expires = accounts.request_link(link, self.nonce, frame.sig)
            self.state = State.LINK_PENDING
            return f.LinkPending(rid=frame.rid, token=token, expires_at=expires)
        if isinstance(frame, f.Register):
            account = accounts.register(
                frame.licence, frame.identity, frame.device, self.nonce, frame.sig
            )
            device_id = frame.device.keys.ed25519
        else:
            account = accounts.authenticate(frame.device, self.nonce, frame.sig)
            device_id = frame.device
        self.state = State.AUTHENTICATED
        self.account_id, self.device_id = account.id, device_id
        old = self.server.connections.get(device_id)
        if old is not None:
            old.revoke()  # one live connection per device: the newest wins
        self.server.connections[device_id] = self
        # The device's rate limits outlive this connection: reconnecting buys no fresh burst.
        self._send_bucket, self._claim_bucket = self.server.buckets.setdefault(
            device_id, (self._send_bucket, self._claim_bucket)
        )
        self.server.mailbox.attach(device_id, self)
        self._queue_backlog()
        self.notify(f.Synced())
        return f.Welcome(
            rid=frame.rid,
            account=account.id,
            device=device_id,
            otk_count=self.server.keys.count(device_id),
            expires_at=account.expires_at,
        )

    def _queue_backlog(self) -> None:
        # Synchronous with attach(): no commit can slip in between, so nothing is sent twice.
        while True:
            batch = self.server.mailbox.pending(self.device_id, self.delivered_upto)
            if not batch:
                return
            for env_id, body in batch:
                self.push(env_id, body)

    async def _send(self, frame: f.Send) -> f.ServerFrame:
        limits = self.server.config.limits
        if not frame.envelopes or len(frame.envelopes) > limits.max_envelopes_per_send:
            raise MalformedFrame(f"a send carries 1 to {limits.max_envelopes_per_send} envelopes")
        for env in frame.envelopes:
            if len(env.body) > limits.max_envelope_bytes:
                raise FrameTooLarge(f"envelope exceeds {limits.max_envelope_bytes} bytes")
        if not self._send_bucket.take():
            raise RateLimited("too many sends; slow down")
        expected = set(self.server.accounts.device_ids(frame.account))
        if frame.account == self.account_id:
            expected.discard(self.device_id)
        addressed = {e.device for e in frame.envelopes}
        if addressed != expected or len(addressed) != len(frame.envelopes):
            raise MismatchedDevices(
                "address exactly the account's current devices",
                missing=sorted(expected - addressed),
                extra=sorted(addressed - expected),
            )
        await self.server.mailbox.deposit([(e.device, e.body) for e in frame.envelopes])
        return f.Done(rid=frame.rid)

    def _claim(self, frame: f.ClaimKeys) -> f.ServerFrame:
        if not self._claim_bucket.take(max(1, len(frame.devices))):
            raise RateLimited("too many key claims; slow down")
        bundles, low = self.server.keys.claim(frame.account, frame.devices)
        for device_id in low:
            conn = self.server.connections.get(device_id)
            if conn is not None:
                conn.notify(f.KeysLow(otk_count=self.server.keys.count(device_id)))
        return f.Bundles(rid=frame.rid, bundles=bundles)

    def _revoke(self, frame: f.Revoke) -> f.ServerFrame:
        device = frame.revocation.device
        self.server.accounts.revoke(self.account_id, frame.revocation)
        self.server.mailbox.forget(device)
        conn = self.server.connections.get(device)
        if conn is not None:
            conn.revoke()
        if device == self.device_id:
            self.close_requested = True
        return f.Done(rid=frame.rid)
