"""Interactive SAS verification between two devices, over Kluis messages (sans-IO).

Theory of operation. The requester R asks every device of the peer's account; one device A of
the peer takes it up. All messages travel inside Olm between the two devices, so each side
knows which device it talks to; the humans then confirm that the device is the person's::

    R                                          A (one device of the peer)
    VerifyRequest(txn)            ──────▶      kept as pending until its user runs `verify`
                                  ◀──────      VerifyAccept(commitment = H(A's SAS key, context))
    VerifyKey(R's SAS key)        ──────▶
                                  ◀──────      VerifyKey(A's SAS key)     R checks the commitment
    both show 7 emoji and 3 numbers: HKDF of the DH secret, info naming both accounts, devices,
    SAS keys and txn. Each user compares; "yes" sends VerifyMac (MACs over the sender's identity
    key and device key), "no" sends VerifyCancel. Each side checks the other's MAC against the
    keys it pinned for that account and device, then sends VerifyDone; a side that has checked
    the MAC and received the other's VerifyDone records the peer as verified.

A commits to its key before it sees R's, and R shows its key before it sees A's: neither can
choose its key after seeing the other's (a man in the middle would have to match a 42-bit code
blind). The ephemeral SAS keys live in memory only (vodozemac cannot persist them): a flow is
as long as one `verify` run, at most :data:`TIMEOUT_MS`.

Both users run `verify` at about the same time. If both ask at once, the request from the
smaller (account, device) wins on both sides and the other side answers it. A message for an
unknown transaction, from another device, or out of turn changes nothing (it is counted in
:attr:`Verifications.ignored`); a failing commitment or MAC, a "no", or the timeout cancel the
flow on both sides.

A verified account is recorded (encrypted, in the profile) with its identity key and the
devices verified by SAS. Devices its identity certifies later are trusted as before; but if the
identity changes or a verified device goes (revoked, unlisted, other keys), the verification is
*broken*: :meth:`Verifications.require_intact` refuses every send to that account except the
verification messages themselves, until a fresh SAS succeeds.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import msgspec

from kluis.client.records import Pins
from kluis.client.sas_emoji import EMOJI
from kluis.client.store.protocol import ClientStore
from kluis.crypto.sas import EstablishedSas, SasKeys
from kluis.errors import LocalProtocolError, VerificationBroken, VerificationFailed
from kluis.protocol.payload import (
    Payload,
    VerifyAccept,
    VerifyCancel,
    VerifyDone,
    VerifyKey,
    VerifyMac,
    VerifyPayload,
    VerifyRequest,
)

__all__ = [
    "TIMEOUT_MS",
    "VERIFY_KINDS",
    "Directory",
    "ShortCode",
    "State",
    "Status",
    "Verification",
    "Verifications",
    "VerifiedRecord",
]

TIMEOUT_MS = 10 * 60 * 1000  # a flow, and a request waiting for its answer
TXN_BYTES = 16
IGNORED_KEEP = 100
VERIFY_KINDS = (VerifyRequest, VerifyAccept, VerifyKey, VerifyMac, VerifyDone, VerifyCancel)


class State(Enum):
    REQUESTED = "requested"  # we asked; waiting for a device of the peer to accept
    ACCEPTED = "accepted"  # we accepted (committed to our key); waiting for the requester's key
    KEY_SENT = "key_sent"  # we asked, they accepted, we sent our key; waiting for theirs
    COMPARING = "comparing"  # both keys in: the users compare the short code
    CONFIRMED = "confirmed"  # our user said they match; our MAC is sent; waiting for theirs
    MAC_CHECKED = "mac_checked"  # their MAC holds; our done is sent; waiting for theirs
    VERIFIED = "verified"
    CANCELLED = "cancelled"


_TERMINAL = frozenset({State.VERIFIED, State.CANCELLED})

# Every transition a flow makes: (state, event) -> next state. Events are the kinds received
# ("accept", "key", "mac", "done") and the local acts ("confirm"); "cancel" (received, declined,
# failed or timed out) leads from any open state to CANCELLED. Anything else is refused: a
# local act out of turn raises LocalProtocolError, a message out of turn is ignored.
_NEXT: dict[tuple[State, str], State] = {
    (State.REQUESTED, "accept"): State.KEY_SENT,
    (State.ACCEPTED, "key"): State.COMPARING,
    (State.KEY_SENT, "key"): State.COMPARING,
    (State.COMPARING, "mac"): State.COMPARING,  # early: kept until our user confirms
    (State.COMPARING, "confirm"): State.CONFIRMED,
    (State.CONFIRMED, "mac"): State.MAC_CHECKED,
    (State.MAC_CHECKED, "done"): State.VERIFIED,
    **{(s, "cancel"): State.CANCELLED for s in State if s not in _TERMINAL},
}


class Status(Enum):
    UNVERIFIED = "unverified"
    VERIFIED = "verified"
    BROKEN = "broken"  # verified once; its identity or a verified device changed since


@dataclass(frozen=True, slots=True)
class ShortCode:
    """What both users compare: 7 emoji (symbol, name) and 3 numbers."""

    emoji: tuple[tuple[str, str], ...]
    decimals: tuple[int, int, int]

    def __post_init__(self) -> None:
        if len(self.emoji) != 7 or not all(1000 <= d <= 9191 for d in self.decimals):
            raise ValueError("a short code has 7 emoji and 3 numbers in 1000..9191")

    def emoji_line(self) -> str:
        return "  ".join(f"{symbol} {name}" for symbol, name in self.emoji)

    def decimal_line(self) -> str:
        return " ".join(str(d) for d in self.decimals)


@dataclass(frozen=True, slots=True)
class Verification:
    """One flow as the application sees it."""

    txn: bytes
    peer: str  # account
    peer_device: str  # "" until a device of the peer took the request up
    state: State
    short_code: ShortCode | None = None  # from COMPARING on
    reason: str = ""  # why it was cancelled


class VerifiedRecord(msgspec.Struct):
    """An account verified by SAS, as kept in the profile."""

    account: str
    identity: str
    devices: dict[str, str]  # each device verified by SAS: ed25519 -> curve25519
    verified_at: int  # milliseconds, our clock
    broken: str = ""  # why the verification no longer holds; only a fresh SAS clears it


class _Pending(msgspec.Struct):
    """A request that arrived while no `verify` with its sender was running."""

    txn: bytes
    device: str
    received: int  # milliseconds, our clock


class Directory(Protocol):
    """What the flows need from the client core: who we are and what we pinned for a peer."""

    @property
    def account_id(self) -> str: ...

    @property
    def device_id(self) -> str: ...

    @property
    def identity_key(self) -> str: ...

    def pinned(self, account: str) -> Pins | None: ...


@dataclass(eq=False)
class _Flow:
    txn: bytes
    peer: str
    we_asked: bool
    started: int
    state: State
    peer_device: str = ""
    keys: SasKeys = field(default_factory=SasKeys)
    sas: EstablishedSas | None = None
    their_key: str = ""
    commitment: bytes = b""
    early_mac: VerifyMac | None = None
    code: ShortCode | None = None
    checked: tuple[str, str] = ("", "")  # (identity, device curve25519) their MAC proved
    reason: str = ""

    def view(self) -> Verification:
        return Verification(
            self.txn, self.peer, self.peer_device, self.state, self.code, self.reason
        )


def _commitment(
    txn: bytes, requester: tuple[str, str], accepter: tuple[str, str], key: str
) -> bytes:
    parts = ["KLUIS_SAS_COMMIT_V1", *requester, *accepter, key, txn.hex()]
    return hashlib.sha256("|".join(parts).encode()).digest()


_enc = msgspec.msgpack.Encoder()
_record_dec = msgspec.msgpack.Decoder(VerifiedRecord)
_pending_dec = msgspec.msgpack.Decoder(_Pending)


class Verifications:
    """The SAS flows of one device, and the verified accounts in its profile.

    Feed it what arrived (:meth:`receive`, from the core's ``_apply``) and what the user did
    (:meth:`begin`, :meth:`confirm`, :meth:`cancel`, :meth:`expire`); send what
    :meth:`take_outbox` hands back, each payload to every device of its account.
    """

    def __init__(
        self,
        store: ClientStore,
        me: Directory,
        *,
        clock_ms: Callable[[], int],
        random: Callable[[int], bytes],
    ) -> None:
        self._store = store
        self._me = me
        self._now = clock_ms
        self._random = random
        self._flows: dict[bytes, _Flow] = {}
        self._outbox: list[tuple[str, Payload]] = []
        self.ignored: list[str] = []  # why recent verification messages changed nothing
        self._requests: list[str] = []  # accounts whose request now waits for our user

    # ---- what the user does -------------------------------------------------------------------

    def begin(self, peer: str) -> Verification:
        """Answer a waiting request from ``peer``, or ask ``peer`` (all its devices)."""
        if peer == self._me.account_id:
            raise LocalProtocolError("your own devices are certified by your identity already")
        if self._me.pinned(peer) is None:
            raise LocalProtocolError(f"no device list for {peer} yet")
        self.expire()
        live = self._live(peer)
        if live is not None:
            return live.view()
        pending = self._take_pending(peer)
        if pending is not None:
            return self._answer(peer, pending.device, pending.txn).view()
        flow = _Flow(self._random(TXN_BYTES), peer, True, self._now(), State.REQUESTED)
        self._flows[flow.txn] = flow
        self._send(flow, VerifyRequest, for_device=None)
        return flow.view()

    def confirm(self, txn: bytes, match: bool) -> Verification:
        """Our user compared the short codes: ``match`` sends our MAC, else cancels."""
        flow = self._flows.get(txn)
        if flow is None or flow.state is not State.COMPARING:
            raise LocalProtocolError("there is no short code to confirm in this verification")
        if not match:
            self._fail(flow, "mismatch", "the short codes differ")
            return flow.view()
        sas = self._need_sas(flow)
        self._move(flow, "confirm")
        me, dev = self._me.account_id, self._me.device_id
        self._send(
            flow,
            VerifyMac,
            identity_mac=sas.mac(self._me.identity_key, self._mac_info(flow, "identity", me, dev)),
            device_mac=sas.mac(dev, self._mac_info(flow, "device", me, dev)),
        )
        if flow.early_mac is not None:
            self._check_mac(flow, flow.early_mac)
        return flow.view()

    def cancel(self, txn: bytes, reason: str = "cancelled by the user") -> None:
        flow = self._flows.get(txn)
        if flow is not None and flow.state not in _TERMINAL:
            self._fail(flow, "user", reason)

    def expire(self) -> None:
        """Cancel every flow older than :data:`TIMEOUT_MS`."""
        now = self._now()
        for flow in list(self._flows.values()):
            if flow.state not in _TERMINAL and now - flow.started > TIMEOUT_MS:
                self._fail(flow, "timeout", "no answer in time")

    def current(self, peer: str) -> Verification | None:
        """The latest flow with ``peer`` (one that answered a crossing request replaces ours)."""
        for flow in reversed(self._flows.values()):
            if flow.peer == peer:
                return flow.view()
        return None

    def views(self) -> list[Verification]:
        """Every flow of this run, oldest first (for an application that follows them)."""
        return [flow.view() for flow in self._flows.values()]

    def active(self) -> bool:
        """Whether a flow is under way (its next message may come any moment)."""
        return any(flow.state not in _TERMINAL for flow in self._flows.values())

    def take_requests(self) -> list[str]:
        """Accounts that asked for a verification no flow of ours answers yet, each once per
        request: the user answers with :meth:`begin`."""
        out, self._requests = self._requests, []
        return out

    def take_outbox(self) -> list[tuple[str, Payload]]:
        """(account, payload) to send, in order; each is handed out once."""
        out, self._outbox = self._outbox, []
        return out

    # ---- what arrives -------------------------------------------------------------------------

    def receive(self, account: str, device: str, payload: VerifyPayload) -> None:
        """A checked payload from ``account``/``device`` (the Olm-authenticated sender)."""
        if account == self._me.account_id:
            self._ignore("verification messages from our own account")
            return None
        self.expire()
        if isinstance(payload, VerifyRequest):
            self._on_request(account, device, payload)
            return None
        flow = self._flows.get(payload.txn)
        if flow is None:  # taken up by another of our devices, or given up: do not answer it
            self._drop_pending(account, payload.txn)
        if flow is None or flow.peer != account:
            self._ignore("unknown verification")
            return None
        broadcast = isinstance(payload, VerifyCancel) and not payload.for_device  # before a lock
        if payload.for_device != self._me.device_id and not broadcast:
            self._ignore("verification message for another device")
            return None
        if flow.state in _TERMINAL:
            self._ignore("verification is over")
            return None
        if flow.peer_device and device != flow.peer_device:
            if isinstance(payload, VerifyAccept):  # another device was first: tell this one
                reason = "another device took this verification up"
                cancel = self._payload(
                    flow, VerifyCancel, for_device=device, code="taken", reason=reason
                )
                self._outbox.append((flow.peer, cancel))
            self._ignore("verification message from another device")
            return None
        match payload:
            case VerifyCancel():
                self._move(flow, "cancel")
                flow.reason = f"{account} cancelled ({payload.code}): {payload.reason}"
            case VerifyAccept():
                self._on_accept(flow, device, payload)
            case VerifyKey():
                self._on_key(flow, payload)
            case VerifyMac():
                self._on_mac(flow, payload)
            case VerifyDone():
                self._on_done(flow)

    def _on_request(self, account: str, device: str, req: VerifyRequest) -> None:
        if len(req.txn) != TXN_BYTES or req.txn in self._flows:
            self._ignore("malformed or repeated verification request")
            return None
        live = self._live(account)
        if live is None:
            self._store.put(
                self._pending_name(account), _enc.encode(_Pending(req.txn, device, self._now()))
            )
            self._requests.append(account)
            return None
        if live.state is State.REQUESTED:
            # Both asked at once: the smaller (account, device) wins, the same on both sides.
            if (account, device) > (self._me.account_id, self._me.device_id):
                self._ignore("our own request wins over a crossing one")
                return None
        elif live.state is not State.ACCEPTED:
            self._ignore("a verification with this account is under way")
            return None
        # Ours loses, or we answered an older request that got no further: take this one.
        self._move(live, "cancel")
        live.reason = "replaced by the peer's request"
        self._answer(account, device, req.txn)
        return None

    def _on_accept(self, flow: _Flow, device: str, accept: VerifyAccept) -> None:
        if not self._allowed(flow, "accept"):
            self._ignore("verification accept out of turn")
            return None
        if len(accept.commitment) != 32:
            self._fail(flow, "bad_message", "the commitment is not a SHA-256 digest")
            return None
        flow.peer_device, flow.commitment = device, accept.commitment
        self._move(flow, "accept")
        self._send(flow, VerifyKey, key=flow.keys.public_key)
        return None

    def _on_key(self, flow: _Flow, msg: VerifyKey) -> None:
        if not self._allowed(flow, "key"):
            self._ignore("verification key out of turn")
            return None
        if flow.we_asked:
            me = (self._me.account_id, self._me.device_id)
            expected = _commitment(flow.txn, me, (flow.peer, flow.peer_device), msg.key)
            if not hmac.compare_digest(expected, flow.commitment):
                self._fail(flow, "commitment", "the peer's key does not match its commitment")
                return None
        try:
            flow.sas = flow.keys.agree(msg.key)
        except VerificationFailed as exc:
            self._fail(flow, "bad_key", exc.message)
            return None
        flow.their_key = msg.key
        if not flow.we_asked:
            self._send(flow, VerifyKey, key=flow.keys.public_key)
        requester, accepter = self._sides(flow)
        info = "|".join(["KLUIS_SAS_V1", *requester, *accepter, flow.txn.hex()])
        raw = flow.sas.short_code(info)
        flow.code = ShortCode(tuple(EMOJI[i] for i in raw.emoji_indices), raw.decimals)
        self._move(flow, "key")
        return None

    def _on_mac(self, flow: _Flow, mac: VerifyMac) -> None:
        if not self._allowed(flow, "mac") or (flow.state is State.COMPARING and flow.early_mac):
            self._ignore("verification MAC out of turn")
            return None
        if flow.state is State.COMPARING:
            flow.early_mac = mac  # checked once our own user has confirmed
            return None
        self._check_mac(flow, mac)
        return None

    def _on_done(self, flow: _Flow) -> None:
        if not self._allowed(flow, "done"):
            self._ignore("verification done out of turn")
            return None
        self._move(flow, "done")
        self._record(flow)
        return None

    def _check_mac(self, flow: _Flow, mac: VerifyMac) -> None:
        """Their MAC over the identity and device key we pinned for them; then our done."""
        sas = self._need_sas(flow)
        pins = self._me.pinned(flow.peer)
        record = pins.known.get(flow.peer_device) if pins else None
        if pins is None or record is None or flow.peer_device not in pins.active:
            self._fail(flow, "unknown_device", "the peer's device is not certified")
            return None
        peer, dev = flow.peer, flow.peer_device
        try:
            sas.verify_mac(
                pins.identity, self._mac_info(flow, "identity", peer, dev), mac.identity_mac
            )
            sas.verify_mac(dev, self._mac_info(flow, "device", peer, dev), mac.device_mac)
        except VerificationFailed as exc:
            self._fail(flow, "mac", exc.message)
            return None
        flow.checked = (pins.identity, record.keys.curve25519)
        self._move(flow, "mac")
        self._send(flow, VerifyDone)
        return None

    # ---- verified accounts --------------------------------------------------------------------

    def record(self, account: str) -> VerifiedRecord | None:
        raw = self._store.get(self._record_name(account))
        return _record_dec.decode(raw) if raw else None

    def status(self, account: str) -> tuple[Status, str]:
        """Whether ``account`` is verified, and if the verification broke, why."""
        rec = self.record(account)
        if rec is None:
            return Status.UNVERIFIED, ""
        reason = rec.broken or _broken_reason(rec, self._me.pinned(account))
        return (Status.BROKEN, reason) if reason else (Status.VERIFIED, "")

    def require_intact(self, account: str) -> None:
        """Raise VerificationBroken if ``account`` was verified and its keys changed since.

        The break is kept: the same keys coming back later do not mend it, a fresh SAS does.
        """
        rec = self.record(account)
        if rec is None:
            return None
        reason = rec.broken or _broken_reason(rec, self._me.pinned(account))
        if not reason:
            return None
        if not rec.broken:
            rec.broken = reason
            self._store.put(self._record_name(account), _enc.encode(rec))
        raise VerificationBroken(
            f"{account} was verified, but {reason}: verify again before writing to it",
            account=account,
        )

    def _record(self, flow: _Flow) -> None:
        identity, curve = flow.checked
        old = self.record(flow.peer)
        pins = self._me.pinned(flow.peer)
        devices: dict[str, str] = {}
        if old is not None and pins is not None and old.identity == identity:
            devices = {  # earlier verified devices that are still what they were
                d: c
                for d, c in old.devices.items()
                if d in pins.active and pins.known[d].keys.curve25519 == c
            }
        devices[flow.peer_device] = curve
        rec = VerifiedRecord(flow.peer, identity, devices, self._now())
        self._store.put(self._record_name(flow.peer), _enc.encode(rec))

    # ---- helpers ------------------------------------------------------------------------------

    def _record_name(self, account: str) -> str:
        return "verified:" + self._store.blind(account).hex()

    def _pending_name(self, account: str) -> str:
        return "verify-request:" + self._store.blind(account).hex()

    def _take_pending(self, peer: str) -> _Pending | None:
        name = self._pending_name(peer)
        raw = self._store.get(name)
        if not raw:
            return None
        self._store.put(name, b"")
        pending = _pending_dec.decode(raw)
        pins = self._me.pinned(peer)
        fresh = self._now() - pending.received <= TIMEOUT_MS
        if not fresh or pins is None or pending.device not in pins.active:
            return None
        return pending

    def _drop_pending(self, peer: str, txn: bytes) -> None:
        """A later `verify` here must not answer a request that is over elsewhere."""
        name = self._pending_name(peer)
        raw = self._store.get(name)
        if raw and _pending_dec.decode(raw).txn == txn:
            self._store.put(name, b"")

    def _live(self, peer: str) -> _Flow | None:
        for flow in self._flows.values():
            if flow.peer == peer and flow.state not in _TERMINAL:
                return flow
        return None

    def _answer(self, peer: str, device: str, txn: bytes) -> _Flow:
        flow = _Flow(txn, peer, False, self._now(), State.ACCEPTED, peer_device=device)
        self._flows[txn] = flow
        me = (self._me.account_id, self._me.device_id)
        commitment = _commitment(txn, (peer, device), me, flow.keys.public_key)
        self._send(flow, VerifyAccept, commitment=commitment)
        return flow

    def _sides(self, flow: _Flow) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
        """(account, device, SAS key) of the requester, then of the accepter."""
        ours = (self._me.account_id, self._me.device_id, flow.keys.public_key)
        theirs = (flow.peer, flow.peer_device, flow.their_key)
        return (ours, theirs) if flow.we_asked else (theirs, ours)

    def _mac_info(self, flow: _Flow, key_id: str, account: str, device: str) -> str:
        """Binds the MAC to its sender and receiver (accounts, devices, SAS keys), txn and key."""
        ours = (self._me.account_id, self._me.device_id, flow.keys.public_key)
        theirs = (flow.peer, flow.peer_device, flow.their_key)
        sender, receiver = (ours, theirs) if account == self._me.account_id else (theirs, ours)
        if (sender[0], sender[1]) != (account, device):
            raise LocalProtocolError("MAC info for a device outside this verification")
        return "|".join(["KLUIS_SAS_MAC_V1", *sender, *receiver, flow.txn.hex(), key_id])

    def _need_sas(self, flow: _Flow) -> EstablishedSas:
        if flow.sas is None:
            raise LocalProtocolError("no SAS secret yet in this verification")
        return flow.sas

    def _allowed(self, flow: _Flow, event: str) -> bool:
        return (flow.state, event) in _NEXT

    def _move(self, flow: _Flow, event: str) -> None:
        nxt = _NEXT.get((flow.state, event))
        if nxt is None:
            raise LocalProtocolError(f"no {event!r} in verification state {flow.state.value}")
        flow.state = nxt

    def _fail(self, flow: _Flow, code: str, reason: str) -> None:
        """Cancel on both sides: nothing is verified."""
        self._send(flow, VerifyCancel, code=code, reason=reason)
        self._move(flow, "cancel")
        flow.reason = reason

    def _ignore(self, why: str) -> None:
        self.ignored = [*self.ignored[-(IGNORED_KEEP - 1) :], why]

    def _payload(self, flow: _Flow, kind: type[VerifyPayload], **fields: Any) -> VerifyPayload:
        return kind(id=self._random(16), ts=self._now(), to=flow.peer, txn=flow.txn, **fields)

    def _send(
        self, flow: _Flow, kind: type[VerifyPayload], *, for_device: str | None = "", **kw: Any
    ) -> None:
        target = {} if for_device is None else {"for_device": for_device or flow.peer_device}
        self._outbox.append((flow.peer, self._payload(flow, kind, **target, **kw)))


def _broken_reason(rec: VerifiedRecord, pins: Pins | None) -> str:
    """Why ``rec`` no longer holds for the account's keys as pinned ("" when it holds)."""
    if pins is None:
        return ""
    if pins.identity != rec.identity:
        return "its identity key changed"
    for device, curve in sorted(rec.devices.items()):
        short = device[:8] + "…"
        if device in pins.revoked:
            return f"the verified device {short} was revoked"
        if device not in pins.active:
            return f"the verified device {short} is no longer listed"
        if pins.known[device].keys.curve25519 != curve:
            return f"the verified device {short} has other keys"
    return ""
