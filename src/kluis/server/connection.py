"""One client connection: authentication state and the handler for each request frame.

Theory of operation: a connection starts in ``AWAITING_AUTH`` holding a fresh random nonce (sent
as the ``Challenge``). ``Register`` or ``Auth`` with a valid signature moves it to
``AUTHENTICATED``; ``LinkRequest`` moves it to ``LINK_PENDING`` (a new device waiting for its
approval, which may only wait). Every other request needs ``AUTHENTICATED``. Each request gets
exactly one answer frame; a refused request changes nothing and leaves the connection usable,
except a refused login: one login attempt per connection, then the connection is closed (a
signature check costs the server far more than the attempt costs the client).

Delivery: the connection subscribes for its device on the delivery bus (``server/delivery``)
at login. The mailbox is the truth: the device's envelopes are read from the store one page at a
time (count and bytes bounded), from the last sequence number delivered, the next page only once
the transport has taken the previous one. When a read comes back empty the connection is in
step; from then on, an envelope announced on the bus with the next expected number is queued
from the announcement itself, and any other announcement (a gap, or one that arrives while a
read is in flight) sends the connection back to reading the store. So nothing depends on the
order in which commits and reads finish, or on one event loop. ``Deliver`` frames are capped in
bytes.

The transport (``server/websocket.py``, or ``server/inprocess.py`` in memory) owns the channel:
it feeds raw frames to :meth:`handle` and writes what :meth:`handle` returns and what
:meth:`take_outgoing` yields (deliveries).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

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
from kluis.server.accounts import Accounts
from kluis.server.blobs import BlobService
from kluis.server.config import Limits
from kluis.server.delivery.protocol import DeliveryBus
from kluis.server.keys import KeyDirectory
from kluis.server.mailbox import Mailbox
from kluis.server.metrics import Metrics
from kluis.server.operator.subscriptions import Subscriptions
from kluis.server.operator.wipe import Wipes
from kluis.server.ratelimit import BucketMap, LogLimiter
from kluis.server.redis_state import RedisState
from kluis.server.store.protocol import Account

log = logging.getLogger("kluis.server")


class State(enum.Enum):
    AWAITING_AUTH = "awaiting_auth"
    LINK_PENDING = "link_pending"
    AUTHENTICATED = "authenticated"
    WIPING = "wiping"  # a device ordered wiped: it may only confirm (server/operator/wipe.py)
    CLOSED = "closed"


_LOGIN: frozenset[type] = frozenset({f.Register, f.Auth, f.LinkRequest})
_SESSION: frozenset[type] = frozenset(
    {f.Send, f.Ack, f.UploadKeys, f.ListDevices, f.ClaimKeys, f.LinkFetch, f.LinkApprove, f.Revoke}
) | {f.BlobUpload, f.BlobDownload, f.BlobFetched, f.Renew, f.WipeDevice}

# The state machine as data: the requests each state accepts. Login requests move
# AWAITING_AUTH to AUTHENTICATED (Register, Auth) or LINK_PENDING (LinkRequest); nothing else
# changes the state. A request a state does not accept is refused and changes nothing.
ACCEPTS: dict[State, frozenset[type]] = {
    State.AWAITING_AUTH: _LOGIN,
    State.LINK_PENDING: frozenset(),
    State.AUTHENTICATED: _SESSION,
    State.WIPING: frozenset({f.WipeDone}),
    State.CLOSED: frozenset(),
}
REFUSALS: dict[State, str] = {
    State.AWAITING_AUTH: "sign the challenge first (auth or register)",
    State.LINK_PENDING: "this device waits for approval; reconnect once approved",
    State.AUTHENTICATED: "already logged in on this connection",
    State.WIPING: "this device was ordered wiped: erase the profile and confirm",
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


@dataclass(frozen=True, slots=True)
class Services:
    """What the request handlers use; built by ``server/app.py``."""

    limits: Limits
    origin: str  # what login signatures are bound to (signing.origin)
    accounts: Accounts
    keys: KeyDirectory
    mailbox: Mailbox
    bus: DeliveryBus
    # Token buckets kept across connections (reconnecting buys no fresh burst): sends and key
    # claims per device, and one-time keys handed out per target device, whoever claims.
    send_buckets: BucketMap
    claim_buckets: BucketMap
    target_buckets: BucketMap
    failures: LogLimiter  # requests that failed inside the server
    blobs: BlobService | None = None  # attachments (server/blobs.py); None: not kept here
    subscriptions: Subscriptions | None = None  # expiry and suspension (server/operator/)
    wipes: Wipes | None = None  # remote wipe orders (server/operator/wipe.py)
    operator_key: str = ""  # the operator's public key, published in Welcome
    metrics: Metrics = field(default_factory=Metrics)  # node totals (server/metrics.py)
    # Several nodes: rate limits, mailbox counters and device-list versions in Redis (held by
    # the buckets, the mailbox and the accounts too; here for its start and close).
    redis_state: RedisState | None = None


class Connection:
    """One device's connection; a ``delivery.Subscriber`` once logged in."""

    def __init__(self, services: Services, wake: Callable[[], None]) -> None:
        self.server = services
        self.state = State.AWAITING_AUTH
        self.nonce = secrets.token_bytes(32)
        self.account_id = ""
        self.device_id = ""
        self.delivered_upto = 0  # the last envelope id queued (or sent) to this device
        self._wake = wake  # tells the transport that frames are waiting
        self._outgoing: list[f.InEnvelope] = []
        self._outgoing_bytes = 0
        self._notices: list[f.ServerFrame] = []
        self.backlog = False  # envelopes may wait in the store: read them page by page
        self._read: asyncio.Task[None] | None = None  # the page read in flight
        self._stale = False  # an announcement came during that read: read once more
        self._synced_owed = False  # Synced goes out once the login's backlog is through
        limits = services.limits
        self._batch = max(1, min(limits.push_batch, f.MAX_ACK_IDS))
        self._page_bytes = max(
            0, limits.max_deliver_bytes - _DELIVER_OVERHEAD - self._batch * _ENVELOPE_OVERHEAD
        )
        self.close_requested = False
        self.close_reason = b"replaced or revoked"
        self._account: Account | None = None  # as read at login or since (see _may_send)
        self._account_read_at = 0.0
        self._announced_at: float | None = None  # when the first live envelope waiting came
        services.metrics.connections += 1

    # ---- delivery ---------------------------------------------------------------------------

    def envelope(self, seq: int, body: bytes | None) -> None:
        """The bus announced an envelope committed for this device."""
        if seq <= self.delivered_upto or self.state is not State.AUTHENTICATED:
            return  # already queued or sent
        if self._read is not None:
            self._stale = True  # the read in flight may have missed it
            return
        if self.backlog:
            return  # the next read will find it
        if body is None or seq != self.delivered_upto + 1:
            self._to_store()  # a gap: what is missing is in the store
            return
        if self._outgoing_bytes + len(body) > self._page_bytes and self._outgoing:
            # The client is not keeping up: what waits here is in the store too, so drop it
            # and read it back in pages rather than hold it all in memory.
            self.delivered_upto = self._outgoing[0].id - 1
            self._outgoing, self._outgoing_bytes = [], 0
            self._announced_at = None
            self._to_store()
            return
        self.delivered_upto = seq
        if not self._outgoing:
            self._announced_at = time.perf_counter()  # one reading per batch, for push latency
            if not self._notices:
                self._wake()
        self._outgoing.append(f.InEnvelope(id=seq, body=body))
        self._outgoing_bytes += len(body)

    def _to_store(self) -> None:
        self.backlog = True
        self._wake()

    def keys_low(self, count: int) -> None:
        self.notify(f.KeysLow(otk_count=count))

    def displaced(self) -> None:
        self.close_requested = True  # one live connection per device: the newest wins
        self._wake()

    def revoked(self) -> None:
        self.close_requested = True
        self._wake()

    def notify(self, frame: f.ServerFrame) -> None:
        if not self._outgoing and not self._notices:
            self._wake()
        self._notices.append(frame)

    @property
    def reading(self) -> bool:
        """A page read is in flight: it wakes the transport when it is done."""
        return self._read is not None

    def take_outgoing(self) -> list[bytes]:
        """Frames to write now: waiting envelopes, then notices.

        While :attr:`backlog` stays True and no read is in flight (:attr:`reading`), the
        transport calls again once it has room: that call starts the next page's read.
        """
        if self.backlog and not self._outgoing and self._read is None:
            self._stale = False
            self._read = asyncio.get_running_loop().create_task(self._read_page())
        pending, self._outgoing, self._outgoing_bytes = self._outgoing, [], 0
        if pending:
            metrics = self.server.metrics
            metrics.delivered += len(pending)
            if self._announced_at is not None:
                metrics.push_seconds.observe(time.perf_counter() - self._announced_at)
                self._announced_at = None
        out = deliver_frames(pending, self.server.limits.max_deliver_bytes, self._batch)
        out.extend(f.encode(n) for n in self._notices)
        self._notices = []
        if self._synced_owed and not self.backlog and self._read is None:
            self._synced_owed = False
            out.append(f.encode(f.Synced()))  # after the backlog's last envelope
        return out

    async def _read_page(self) -> None:
        try:
            page = await self.server.mailbox.pending(
                self.device_id, self.delivered_upto, self._page_bytes
            )
        except Exception as exc:
            self.server.failures.error("a mailbox read failed", exc)
            self.close_requested = True  # the device reconnects and reads again
            self.close_reason = b"server error"
            page = []
        finally:
            self._read = None
        if self.state is not State.AUTHENTICATED:
            return
        for env_id, body in page:
            self._outgoing.append(f.InEnvelope(id=env_id, body=body))
        if page:
            self.delivered_upto = page[-1][0]
        # Empty: in step, unless an announcement came while reading (it may be newer).
        self.backlog = bool(page) or self._stale
        self._wake()

    def closed(self) -> None:
        if self.state is State.CLOSED:
            return
        if self.state is State.AUTHENTICATED:
            self.server.bus.unsubscribe(self.device_id, self)
        self.state = State.CLOSED
        self.server.metrics.connections -= 1

    # ---- requests ---------------------------------------------------------------------------

    async def handle(self, data: bytes) -> bytes:
        """Answer one request frame; never raises for anything the client sent."""
        rid: int | None = None
        try:
            if len(data) > self.server.limits.max_frame_bytes:
                raise FrameTooLarge(
                    f"frame of {len(data)} bytes exceeds {self.server.limits.max_frame_bytes}"
                )
            frame = f.decode_client_frame(data)
            rid = frame.rid
            reply = await self._dispatch(frame)
        except MismatchedDevices as exc:
            mismatched = [f.Mismatch(a, missing, extra) for a, missing, extra in exc.mismatched]
            reply = f.Error(rid=rid, code=exc.code, message=exc.message, mismatched=mismatched)
            self.server.metrics.error(exc.code)
        except KluisError as exc:
            reply = f.Error(rid=rid, code=exc.code, message=exc.message)
            self.server.metrics.error(exc.code)
        except Exception as exc:
            # One line, rate limited: no traceback, no frame contents, whoever sent it.
            self.server.failures.error("a request failed", exc)
            err = ServerError("the server failed; nothing was changed")
            reply = f.Error(rid=rid, code=err.code, message=err.message)
            self.server.metrics.error(err.code)
        return f.encode(reply)

    async def _dispatch(self, frame: f.ClientFrame) -> f.ServerFrame:
        if type(frame) not in ACCEPTS[self.state]:
            raise Unauthenticated(REFUSALS[self.state])
        match frame:
            case f.Register() | f.Auth() | f.LinkRequest():
                return await self._login(frame)
            case f.Send():
                await self._may_send()
                return await self._send(frame)
            case f.Renew() | f.WipeDevice() | f.WipeDone():
                return await self._operator(frame)
            case f.Ack():
                await self.server.mailbox.acknowledge(self.device_id, frame.ids)
                self.server.metrics.acked += len(frame.ids)
                return f.Done(rid=frame.rid)
            case f.UploadKeys():
                count = await self.server.keys.upload(
                    self.device_id, frame.one_time_keys, frame.fallback_key
                )
                return f.KeyCount(rid=frame.rid, otk_count=count)
            case f.ListDevices():
                identity, devices, revoked = await self.server.accounts.devices(frame.account)
                return f.Devices(
                    rid=frame.rid,
                    account=frame.account,
                    identity=identity,
                    devices=devices,
                    revoked=revoked,
                )
            case f.ClaimKeys():
                return await self._claim(frame)
            case f.LinkFetch():
                await self.server.accounts.check_room(self.account_id)
                device = await self.server.accounts.link_keys(frame.token)
                return f.LinkInfo(rid=frame.rid, device=device)
            case f.LinkApprove():
                await self.server.accounts.check_room(self.account_id)
                await self.server.accounts.approve_link(self.account_id, frame.token, frame.device)
                return f.Done(rid=frame.rid)
            case f.Revoke():
                return await self._revoke(frame)
            case f.BlobUpload() | f.BlobDownload() | f.BlobFetched():
                if self.server.blobs is None:
                    raise MalformedFrame("this server keeps no attachments")
                if isinstance(frame, f.BlobUpload):
                    await self._may_send()
                return await self.server.blobs.answer(self.device_id, frame)
        raise MalformedFrame("unexpected frame")  # pragma: no cover - exhaustive above

    async def _login(self, frame: f.Register | f.Auth | f.LinkRequest) -> f.ServerFrame:
        try:
            return await self._try_login(frame)
        except KluisError:
            # One attempt per connection: the answer goes out, then the connection closes, so
            # each guess or forged signature costs a new connection.
            self.close_requested = True
            self.close_reason = b"login failed"
            raise

    async def _try_login(self, frame: f.Register | f.Auth | f.LinkRequest) -> f.ServerFrame:
        accounts = self.server.accounts
        if isinstance(frame, f.LinkRequest):
            link = f.PendingLink(
                device=frame.device,
                one_time_keys=frame.one_time_keys,
                fallback_key=frame.fallback_key,
            )
            token, expires = await accounts.request_link(link, self.nonce, frame.sig)
            self.state = State.LINK_PENDING
            self.server.metrics.logins["link"] += 1
            return f.LinkPending(rid=frame.rid, token=token, expires_at=expires)
        if isinstance(frame, f.Register):
            account = await accounts.register(
                frame.licence, frame.identity, frame.device, self.nonce, frame.sig
            )
            device_id = frame.device.keys.ed25519
        else:
            account = await accounts.authenticate(frame.device, self.nonce, frame.sig)
            device_id = frame.device
        subscriptions = self.server.subscriptions
        if subscriptions is not None:
            subscriptions.check_login(account)  # suspended: no login
        self.account_id, self.device_id = account.id, device_id
        self._account, self._account_read_at = account, asyncio.get_running_loop().time()
        order = await self.server.wipes.pending(device_id) if self.server.wipes else None
        if order is not None:
            self.state = State.WIPING  # the order, and nothing else, ever again
            return f.Wipe(rid=frame.rid, order=order)
        otk_count = await self.server.keys.count(device_id)
        self.state = State.AUTHENTICATED
        self.server.metrics.logins["register" if isinstance(frame, f.Register) else "auth"] += 1
        self.server.bus.subscribe(device_id, self)  # displaces an older connection
        self.backlog = self._synced_owed = True  # pages follow Welcome, then Synced
        self._wake()
        return f.Welcome(
            rid=frame.rid,
            account=account.id,
            device=device_id,
            otk_count=otk_count,
            expires_at=account.expires_at,
            operator=self.server.operator_key,
        )

    async def _may_send(self) -> None:
        """Refuse a send from an expired or suspended account. The account is read again at
        most every 30 s: a suspension or a renewal made elsewhere (the CLI, the console) takes
        effect within that."""
        subscriptions = self.server.subscriptions
        if subscriptions is None:
            return
        now = asyncio.get_running_loop().time()
        if self._account is None or now - self._account_read_at > 30:
            self._account = await self.server.accounts.account(self.account_id)
            self._account_read_at = now
        subscriptions.check_send(self._account)

    async def _operator(self, frame: f.Renew | f.WipeDevice | f.WipeDone) -> f.ServerFrame:
        subscriptions, wipes = self.server.subscriptions, self.server.wipes
        if subscriptions is None or wipes is None:
            raise MalformedFrame("this server has no operator services")
        if isinstance(frame, f.Renew):
            expires = await subscriptions.renew(self.account_id, frame.licence)
            self._account = await self.server.accounts.account(self.account_id)
            return f.Renewed(rid=frame.rid, expires_at=expires)
        if isinstance(frame, f.WipeDevice):
            await wipes.order(frame.order, self.account_id, self.server.bus)
            return f.Done(rid=frame.rid)
        if frame.revocation.device != self.device_id:
            raise MalformedFrame("a wiped device revokes itself only")
        await self.server.accounts.revoke(self.account_id, frame.revocation)
        self.server.mailbox.forget(self.device_id)
        self.close_requested = True
        self.close_reason = b"wiped"
        return f.Done(rid=frame.rid)

    async def _send(self, frame: f.Send) -> f.ServerFrame:
        accepted = time.perf_counter()
        limits = self.server.limits
        envelopes = [e for part in frame.to for e in part.envelopes]
        if not envelopes or len(envelopes) > limits.max_envelopes_per_send:
            raise MalformedFrame(f"a send carries 1 to {limits.max_envelopes_per_send} envelopes")
        if len({part.account for part in frame.to}) != len(frame.to):
            raise MalformedFrame("a send names each account once")
        for env in envelopes:
            if len(env.body) > limits.max_envelope_bytes:
                raise FrameTooLarge(f"envelope exceeds {limits.max_envelope_bytes} bytes")
        # Rate limits are kept per device across connections: reconnecting buys no fresh burst.
        # A big group send costs like the many small sends it replaces.
        cost = 1 + len(envelopes) // 64
        buckets, accounts = self.server.send_buckets, self.server.accounts
        current: list[frozenset[str]] | None = None
        if buckets.shared is None and accounts.shared_versions is None:  # one node: no await
            if not buckets.get(self.device_id).take(cost):
                raise RateLimited("too many sends; slow down")
        else:
            # Several nodes: the shared bucket and the device-list versions in one round trip.
            names = [part.account for part in frame.to]
            versions = accounts.ask_versions(names) if accounts.shared_versions else None
            if not await buckets.take_shared(self.device_id, cost):
                raise RateLimited("too many sends; slow down")
            if versions is not None:
                current = await accounts.current_device_ids(names, versions)
        mismatched: list[tuple[str, list[str], list[str]]] = []
        for i, part in enumerate(frame.to):
            ids = current[i] if current is not None else accounts.cached_device_ids(part.account)
            expected = set(ids if ids is not None else await accounts.device_ids(part.account))
            if part.account == self.account_id:
                expected.discard(self.device_id)
            addressed = {e.device for e in part.envelopes}
            if addressed != expected or len(addressed) != len(part.envelopes):
                mismatched.append(
                    (part.account, sorted(expected - addressed), sorted(addressed - expected))
                )
        if mismatched:
            raise MismatchedDevices("address exactly each account's current devices", mismatched)
        # All or nothing: one deposit, one commit, for every account of the conversation.
        await self.server.mailbox.deposit([(e.device, e.body) for e in envelopes])
        metrics = self.server.metrics  # one increment and one observation per send
        metrics.deposited += len(envelopes)
        metrics.send_seconds.observe(time.perf_counter() - accepted)
        return f.Done(rid=frame.rid)

    async def _claim(self, frame: f.ClaimKeys) -> f.ServerFrame:
        if not await self.server.claim_buckets.take_shared(
            self.device_id, max(1, len(frame.devices))
        ):
            raise RateLimited("too many key claims; slow down")
        targets = self.server.target_buckets
        # Past its target's budget, whoever claims, a device's bundle carries its fallback key:
        # no burst of claims, from one device or many, drains a device's one-time keys.
        one_time_ok: Callable[[str], bool]
        if targets.shared is None:
            one_time_ok = lambda device_id: targets.get(device_id).take()  # noqa: E731
        else:  # several nodes: every target's shared bucket at once, before the claim
            one_time_ok = (await targets.take_many(frame.devices)).__getitem__
        bundles, low = await self.server.keys.claim(frame.account, frame.devices, one_time_ok)
        for device_id, count in low:
            self.server.bus.keys_low(device_id, count)
        return f.Bundles(rid=frame.rid, bundles=bundles)

    async def _revoke(self, frame: f.Revoke) -> f.ServerFrame:
        device = frame.revocation.device
        await self.server.accounts.revoke(self.account_id, frame.revocation)
        self.server.mailbox.forget(device)
        self.server.bus.revoke(device)  # closes its connection, wherever it is
        if device == self.device_id:
            self.close_requested = True
        return f.Done(rid=frame.rid)
