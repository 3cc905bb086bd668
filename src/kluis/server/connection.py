"""One client connection: authentication state and the handler for each request frame.

Theory of operation: a connection starts in ``AWAITING_AUTH`` holding a fresh random nonce (sent
as the ``Challenge``). ``Register`` or ``Auth`` with a valid signature moves it to
``AUTHENTICATED``; ``LinkRequest`` moves it to ``LINK_PENDING`` (a new device waiting for its
approval, which may only wait). Every other request needs ``AUTHENTICATED``. Each request gets
exactly one answer frame; a refused request changes nothing and leaves the connection usable,
except a refused login: one login attempt per connection, then the connection is closed (a
signature check costs the server far more than the attempt costs the client).

Delivery: after login the device's backlog is read from the database one page at a time (count
and bytes bounded), the next page only once the transport has taken the previous one; envelopes
committed meanwhile wait in the database too. Once a page comes back short the connection is in
step and new envelopes are pushed as they commit. ``Deliver`` frames are capped in bytes.

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

# msgpack bytes around each envelope's body in a Deliver (map, "id", a 64-bit int, "body", bin
# header) and around the list (map, tag, "envelopes", array header): upper bounds.
_ENVELOPE_OVERHEAD = 24
_DELIVER_OVERHEAD = 32


def deliver_frames(envelopes: list[f.InEnvelope], max_bytes: int, max_count: int) -> list[bytes]:
    """Encode ``envelopes`` as Deliver frames of at most ``max_bytes`` and ``max_count`` each;
    an envelope too large for any frame goes alone."""
    out: list[bytes] = []
    batch: list[f.InEnvelope] = []
    size = _DELIVER_OVERHEAD
    for env in envelopes:
        cost = len(env.body) + _ENVELOPE_OVERHEAD
        if batch and (size + cost > max_bytes or len(batch) >= max_count):
            out.append(f.encode(f.Deliver(envelopes=batch)))
            batch, size = [], _DELIVER_OVERHEAD
        batch.append(env)
        size += cost
    if batch:
        out.append(f.encode(f.Deliver(envelopes=batch)))
    return out


class Connection:
    """Implements the mailbox's Recipient protocol: pushes queue up in ``outgoing``."""

    def __init__(self, server: ServerState, wake: Callable[[], None]) -> None:
        self.server = server
        self.state = State.AWAITING_AUTH
        self.nonce = secrets.token_bytes(32)
        self.account_id = ""
        self.device_id = ""
        self.delivered_upto = 0  # the last envelope id queued (or sent) to this device
        self._wake = wake  # tells the transport that pushes are waiting
        self._outgoing: list[f.InEnvelope] = []
        self._outgoing_bytes = 0
        self._notices: list[f.ServerFrame] = []
        self.backlog = False  # envelopes wait in the database: read them page by page
        self._synced_owed = False  # Synced goes out once the login's backlog is through
        limits = server.config.limits
        self._batch = max(1, min(limits.push_batch, f.MAX_ACK_IDS))
        self._page_bytes = max(
            0, limits.max_deliver_bytes - _DELIVER_OVERHEAD - self._batch * _ENVELOPE_OVERHEAD
        )
        self.close_requested = False
        self.close_reason = b"replaced or revoked"

    # ---- pushes -----------------------------------------------------------------------------

    def push(self, envelope_id: int, body: bytes) -> None:
        if self.backlog or envelope_id <= self.delivered_upto:
            return  # a page read will find it in the database, or it was already queued
        if self._outgoing_bytes + len(body) > self._page_bytes and self._outgoing:
            # The client is not keeping up: what waits here is in the database too, so drop
            # it and read it back in pages rather than hold it all in memory.
            self.delivered_upto = self._outgoing[0].id - 1
            self._outgoing, self._outgoing_bytes = [], 0
            self.backlog = True
            self._wake()
            return
        self.delivered_upto = envelope_id
        if not self._outgoing and not self._notices:
            self._wake()
        self._outgoing.append(f.InEnvelope(id=envelope_id, body=body))
        self._outgoing_bytes += len(body)

    def notify(self, frame: f.ServerFrame) -> None:
        if not self._outgoing and not self._notices:
            self._wake()
        self._notices.append(frame)

    def take_outgoing(self) -> list[bytes]:
        """Frames to write now: waiting envelopes (or the next backlog page), then notices.

        While :attr:`backlog` stays True the transport calls again once it has room.
        """
        if self.backlog and not self._outgoing:
            self._read_page()
        pending, self._outgoing, self._outgoing_bytes = self._outgoing, [], 0
        limits = self.server.config.limits
        out = deliver_frames(pending, limits.max_deliver_bytes, self._batch)
        out.extend(f.encode(n) for n in self._notices)
        self._notices = []
        if self._synced_owed and not self.backlog:
            self._synced_owed = False
            out.append(f.encode(f.Synced()))  # after the backlog's last envelope
        return out

    def _read_page(self) -> None:
        # Synchronous, on the loop thread that commits: no envelope can be committed between
        # this read and the switch to live pushes below, so none is skipped or sent twice.
        page = self.server.mailbox.pending(self.device_id, self.delivered_upto, self._page_bytes)
        for env_id, body in page:
            self._outgoing.append(f.InEnvelope(id=env_id, body=body))
        if not page:
            self.backlog = False  # in step: pushes go out as they commit
            return
        self.delivered_upto = page[-1][0]
        # One more (small) read tells whether this page was the last one.
        self.backlog = bool(self.server.mailbox.pending(self.device_id, self.delivered_upto, 0))

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
        except Exception as exc:
            # One line, rate limited: no traceback, no frame contents, whoever sent it.
            self.server.failures.error("a request failed", exc)
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
                self.server.accounts.check_room(self.account_id)
                return f.LinkInfo(rid=frame.rid, device=self.server.accounts.link_keys(frame.token))
            case f.LinkApprove():
                self.server.accounts.check_room(self.account_id)
                self.server.accounts.approve_link(self.account_id, frame.token, frame.device)
                return f.Done(rid=frame.rid)
            case f.Revoke():
                return self._revoke(frame)
        raise MalformedFrame("unexpected frame")  # pragma: no cover - exhaustive above

    def _login(self, frame: f.Register | f.Auth | f.LinkRequest) -> f.ServerFrame:
        try:
            return self._try_login(frame)
        except KluisError:
            # One attempt per connection: the answer goes out, then the connection closes, so
            # each guess or forged signature costs a new connection.
            self.close_requested = True
            self.close_reason = b"login failed"
            raise

    def _try_login(self, frame: f.Register | f.Auth | f.LinkRequest) -> f.ServerFrame:
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
        self.server.mailbox.attach(device_id, self)
        self.backlog = self._synced_owed = True  # pages follow Welcome, then Synced
        self._wake()
        return f.Welcome(
            rid=frame.rid,
            account=account.id,
            device=device_id,
            otk_count=self.server.keys.count(device_id),
            expires_at=account.expires_at,
        )

    async def _send(self, frame: f.Send) -> f.ServerFrame:
        limits = self.server.config.limits
        if not frame.envelopes or len(frame.envelopes) > limits.max_envelopes_per_send:
            raise MalformedFrame(f"a send carries 1 to {limits.max_envelopes_per_send} envelopes")
        for env in frame.envelopes:
            if len(env.body) > limits.max_envelope_bytes:
                raise FrameTooLarge(f"envelope exceeds {limits.max_envelope_bytes} bytes")
        # Rate limits are kept per device across connections: reconnecting buys no fresh burst.
        if not self.server.send_buckets.get(self.device_id).take():
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
        if not self.server.claim_buckets.get(self.device_id).take(max(1, len(frame.devices))):
            raise RateLimited("too many key claims; slow down")
        targets = self.server.target_buckets
        # Past its target's budget, whoever claims, a device's bundle carries its fallback key:
        # no burst of claims, from one device or many, drains a device's one-time keys.
        bundles, low = self.server.keys.claim(
            frame.account, frame.devices, lambda device_id: targets.get(device_id).take()
        )
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
