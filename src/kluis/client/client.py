"""The friendly async API over the sans-IO core and the transport.

    client = await KluisClient.register("ws://127.0.0.1:8448", licence, profile_dir, passphrase)
    await client.send(peer_id, "hello")
    async for message in client.messages():
        print(message.sender, message.text)
    await client.close()

Messages are acknowledged to the server only after they are decrypted and stored in the profile,
so a crash at any point loses nothing (the server redelivers; duplicates are shown once).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import nullcontext, suppress
from pathlib import Path
from types import TracebackType
from typing import Literal, TypeVar, cast

import msgspec

from kluis.client import attachments, operator, wipe
from kluis.client.contacts import Note
from kluis.client.conversations import ConversationInfo
from kluis.client.core import MEGOLM, ClientCore, Message, Opened, Payload, link_fingerprint
from kluis.client.device_labels import DeviceLabels, Label, check_device_name
from kluis.client.events import (
    ConnectionDown,
    ConnectionUp,
    DeviceAlarm,
    Event,
    MessageReceived,
    Undecryptable,
    VerificationChanged,
    VerificationRequested,
)
from kluis.client.groups import GroupState, describe, is_group_id
from kluis.client.outbox import Pending
from kluis.client.records import Sealed
from kluis.client.store import ProfileStore
from kluis.client.transport import Transport, TransportFactory
from kluis.client.verification import State, Status, Verification
from kluis.crypto.profile_key import KdfParams
from kluis.errors import (
    DecryptionError,
    DeviceWiped,
    KluisError,
    LocalProtocolError,
    MalformedFrame,
    MismatchedDevices,
    NotSent,
    TransportError,
    UnknownDevice,
    VerificationFailed,
)
from kluis.identity.chain import ChainView
from kluis.protocol import frames as f
from kluis.protocol.attachment import AttachmentRef
from kluis.protocol.operator import encode_wipe, is_announcement
from kluis.protocol.payload import File, GroupText, Text
from kluis.protocol.signing import origin

_SEND_ATTEMPTS = 3
F = TypeVar("F", bound=f.ClientFrame)


def _with_rid(frame: F) -> Callable[[int], F]:
    return lambda rid: msgspec.structs.replace(frame, rid=rid)


# The longest text message: padded to 64 KiB with its fields, sealed, it stays under the server's
# max_envelope_bytes (96 KiB by default).
MAX_TEXT_BYTES = 60 * 1024
# What one Send carries at most (the server's defaults allow 2 MiB and 2,048 envelopes).
_SEND_BYTES = 1024 * 1024
_SEND_ENVELOPES = 1024


def _label_own_device(core: ClientCore, name: str) -> None:
    """This device was made now: note the day, and its name when given."""
    labels, now = DeviceLabels(core.store), core._now_ms() // 1000
    labels.seen([core.device_id], now)
    if name:
        labels.name(core.device_id, name, now)


def _batches(parts: list[f.Addressed]) -> list[list[f.Addressed]]:
    """``parts`` in Sends of at most _SEND_BYTES and _SEND_ENVELOPES (an account's part whole)."""
    out: list[list[f.Addressed]] = []
    size = count = 0
    for part in parts:
        part_size = sum(len(e.body) + 64 for e in part.envelopes) + 32
        if out and (
            size + part_size > _SEND_BYTES or count + len(part.envelopes) > _SEND_ENVELOPES
        ):
            out.append([])
            size = count = 0
        if not out:
            out.append([])
        out[-1].append(part)
        size += part_size
        count += len(part.envelopes)
    return out


_BACKLOG_TIMEOUT = 10.0
# events() listens this long per receive(): an unreadable envelope is reported within it.
_EVENT_POLL_S = 1.0
_VERIFY_POLL_S = 0.1  # while a SAS verification is under way


async def _connect(transport: Transport, server: str) -> bytes:
    """Connect; refuse a server that names another origin than the one we dialled (a relay)."""
    nonce = await transport.connect()
    try:
        expected = origin(server)
    except ValueError as exc:
        await transport.close()
        raise LocalProtocolError(str(exc)) from exc
    if transport.server_origin != expected:
        await transport.close()
        raise TransportError(
            f"the server at {expected} calls itself {transport.server_origin!r}; "
            "use the URL it gives (its --public-url) or ask its operator"
        )
    return nonce


def _close_code(exc: TransportError) -> int | None:
    code = exc.details.get("close_code")
    return code if isinstance(code, int) else None


def websocket_transport(url: str) -> Transport:
    """The default transport: a WebSocket, loaded at its first use (start-up that an offline
    command does not need)."""
    from kluis.client.transport.websocket import WebSocketTransport

    return WebSocketTransport(url)


class KluisClient:
    def __init__(
        self, core: ClientCore, *, transport_factory: TransportFactory = websocket_transport
    ) -> None:
        self.core = core
        self._dial = transport_factory  # makes the transport to a server URL (tests: in memory)
        self._transport: Transport | None = None
        self.errors: list[KluisError] = []  # why envelopes of the last receive() were unreadable
        self._synced = False  # the server has sent this connection's stored backlog
        self.profile: Path | None = None  # the profile folder (a remote wipe erases it)
        # Outbox messages the server refused when sent again (dropped from the outbox), and why.
        self.outbox_errors: list[tuple[Pending, KluisError]] = []
        self._flushing = False
        # events(): the state of each verification flow last reported, across reconnections
        self._flow_states: dict[bytes, State] = {}
        # Envelopes stored but not acknowledged yet: events() hands their messages over first.
        self._unacked: list[int] = []
        # One flush of the receipts at a time: the app's mark_read() may come while events()
        # flushes a batch's; the second then sends only what the first left (no duplicates).
        self._receipts_lock = asyncio.Lock()

    # ---- opening ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        profile: Path,
        passphrase: str,
        *,
        transport_factory: TransportFactory = websocket_transport,
        key: bytes | None = None,
    ) -> KluisClient:
        """Unlock an existing profile (no network yet). The panic passphrase erases it and fails
        as for a folder without a profile (``client/wipe.py``). ``key``: the profile key,
        derived already from ``passphrase`` (``ProfileStore.open``)."""
        wipe.check_panic(profile, passphrase)
        store = ProfileStore.open(profile, passphrase, key=key)
        core = ClientCore.load(store, clock=time.time, random=secrets.token_bytes)
        client = cls(core, transport_factory=transport_factory)
        client.profile = profile
        return client

    @classmethod
    async def register(
        cls,
        server: str,
        licence: str,
        profile: Path,
        passphrase: str,
        *,
        transport_factory: TransportFactory = websocket_transport,
        kdf: KdfParams | None = None,
        device_name: str = "",
    ) -> KluisClient:
        """Create a profile, redeem ``licence`` and publish this device's keys.

        ``kdf`` overrides the profile's argon2id parameters (benchmarks lower them);
        ``device_name`` names this device in this profile (see ``device_labels.py``)."""
        if device_name:
            check_device_name(device_name)
        store = ProfileStore.create(profile, passphrase, kdf)
        core = ClientCore.create(
            store, server, clock=time.time, random=secrets.token_bytes, new_account=True
        )
        client = cls(core, transport_factory=transport_factory)
        transport = transport_factory(server)
        try:
            nonce = await _connect(transport, server)
            welcome = await transport.request(
                lambda rid: f.Register(
                    rid=rid,
                    licence=licence,
                    identity=core.identity_key,
                    device=core.own_record(),
                    sig=core.sign_challenge(nonce, transport.server_origin),
                ),
                f.Welcome,
            )
        except BaseException:
            await transport.close()
            store.destroy()  # a refused licence or a dead server leaves no half-made profile
            raise
        core.set_account(welcome.account)
        _label_own_device(core, device_name)
        operator.pin_key(store, welcome.operator)  # trust on first use
        operator.note_expiry(store, welcome.expires_at)
        client._transport, client.profile = transport, profile
        await client._upload_keys(welcome.otk_count)
        return client

    @classmethod
    async def request_link(
        cls,
        server: str,
        profile: Path,
        passphrase: str,
        *,
        account: str = "",
        transport_factory: TransportFactory = websocket_transport,
        kdf: KdfParams | None = None,
        device_name: str = "",
    ) -> str:
        """Create a profile for a new device and ask to join an account; return the link code.

        With ``account`` (the ID the user means to join), this device refuses any other account
        the server may later put it in. ``kdf`` and ``device_name`` as for :meth:`register`.
        """
        if device_name:
            check_device_name(device_name)
        store = ProfileStore.create(profile, passphrase, kdf)
        core = ClientCore.create(store, server, clock=time.time, random=secrets.token_bytes)
        if account:
            core.set_account(account)
        transport = transport_factory(server)
        try:
            nonce = await _connect(transport, server)
            otks, fallback = core.keys_to_upload(0)
            pending = await transport.request(
                lambda rid: f.LinkRequest(
                    rid=rid,
                    device=core.device_keys(),
                    sig=core.sign_challenge(nonce, transport.server_origin),
                    one_time_keys=otks,
                    fallback_key=fallback,
                ),
                f.LinkPending,
            )
            core.keys_published()
            core.set_link_token(pending.token)
            _label_own_device(core, device_name)
        except BaseException:
            await transport.close()
            store.destroy()
            raise
        await transport.close()
        code = f"{pending.token}-{link_fingerprint(core.device_keys())}"
        store.close()
        return code

    async def connect(self, *, transport_factory: TransportFactory | None = None) -> None:
        """Authenticate this device; receive anything queued for it.

        ``transport_factory`` replaces the one this client was made with, from now on.
        """
        if self._transport is not None:
            return
        if transport_factory is not None:
            self._dial = transport_factory
        transport = self._dial(self.core.server)
        nonce = await _connect(transport, self.core.server)
        try:
            answer = await transport.request(
                lambda rid: f.Auth(
                    rid=rid,
                    device=self.core.device_id,
                    sig=self.core.sign_challenge(nonce, transport.server_origin),
                ),
                cast(type[f.Welcome], (f.Welcome, f.Wipe)),
            )
            if isinstance(answer, f.Wipe):
                await self._wipe(transport, answer.order)  # raises DeviceWiped
            welcome = answer
            self.core.set_account(welcome.account)  # refuses a server that moved this device
        except UnknownDevice as exc:
            await transport.close()
            if self.core.link_token:
                raise UnknownDevice("this device has not been approved yet") from exc
            raise
        except BaseException:
            await transport.close()
            raise
        self._transport, self._synced = transport, False
        self._unacked = []  # the old connection's: the server delivers them again (duplicates)
        operator.pin_key(self.core.store, welcome.operator)
        operator.note_expiry(self.core.store, welcome.expires_at)
        try:
            await self._upload_keys(welcome.otk_count)
            # Every connection checks our own account's devices: one the identity did not
            # certify is an alarm (see alarms()), and this device must itself be certified.
            await self.refresh_devices(self.account_id)
            await self.flush_outbox()  # what an earlier send could not deliver goes first
        except BaseException:
            self._transport = None
            await transport.close()
            raise

    # ---- the operator's side: subscription, wipe (client/operator.py, client/wipe.py) --------

    @property
    def subscription_end(self) -> int | None:
        """The account's subscription end (unix seconds) as last seen from the server."""
        return operator.expiry(self.core.store)

    def renewal_notice(self) -> str:
        """A line to show from 14 days before the subscription ends, else ""."""
        return operator.renewal_notice(self.core.store, time.time())

    async def renew(self, licence: str) -> int:
        """Redeem a licence code to extend our account; return the new end."""
        renewed = await self.transport.request(
            lambda rid: f.Renew(rid=rid, licence=licence), f.Renewed
        )
        operator.note_expiry(self.core.store, renewed.expires_at)
        return renewed.expires_at

    async def wipe_device(self, device: str) -> None:
        """Order ``device`` of our account to erase its profile (from the first device: the
        order is signed by the account identity). It erases at its next connection."""
        order = self.core.sign_wipe(device, origin(self.core.server), int(time.time()))
        await self.transport.request(
            lambda rid: f.WipeDevice(rid=rid, order=encode_wipe(order)), f.Done
        )

    async def _wipe(self, transport: Transport, order: bytes) -> None:
        """The server answered our login with a wipe order: check it, erase, confirm."""
        store = self.core.store
        operator.check_wipe(
            order,
            account=self.core.account_id,
            device=self.core.device_id,
            server_url=self.core.server,
            operator_key=operator.pinned_key(store),
            identity=self.core.identity_key,
        )
        revocation = self.core.revocation(self.core.device_id)
        store.close()
        if self.profile is not None:
            wipe.erase_profile(self.profile)
        try:
            await transport.request(lambda rid: f.WipeDone(rid=rid, revocation=revocation), f.Done)
        finally:
            await transport.close()
        raise DeviceWiped("this device was wiped by a signed order; its profile is erased")

    def alarms(self) -> list[str]:
        """Devices in our own account that its identity did not certify (a hostile server?)."""
        return self.core.alarms()

    @property
    def quarantined(self) -> int:
        """How many received envelopes could not be read (kept encrypted in the profile)."""
        return self.core.quarantined()

    async def close(self) -> None:
        if self._transport is not None:
            await self._transport.close()
            self._transport = None
        self.core.store.close()

    async def disconnect(self) -> None:
        """Close the connection, if any, and keep the profile open (``connect()`` goes on)."""
        transport, self._transport = self._transport, None
        if transport is not None:
            await transport.close()

    async def __aenter__(self) -> KluisClient:
        await self.connect()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def account_id(self) -> str:
        return self.core.account_id

    @property
    def connected(self) -> bool:
        """Whether a connection is open (it may still fail at the next request)."""
        return self._transport is not None

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            raise LocalProtocolError("not connected; call connect() first")
        return self._transport

    # ---- keys and devices ---------------------------------------------------------------------

    async def _upload_keys(self, server_count: int) -> None:
        otks, fallback = self.core.keys_to_upload(server_count)
        if not otks and fallback is None:
            return
        await self.transport.request(
            lambda rid: f.UploadKeys(rid=rid, one_time_keys=otks, fallback_key=fallback), f.KeyCount
        )
        self.core.keys_published()

    async def refresh_devices(self, account: str) -> ChainView:
        """Fetch an account's device list and keep what its identity certifies."""
        answer = await self.transport.request(
            lambda rid: f.ListDevices(rid=rid, account=account), f.Devices
        )
        if answer.account != account:
            raise MalformedFrame("the server answered for another account")
        return self.core.accept_devices(account, answer.identity, answer.devices, answer.revoked)

    async def devices(self) -> list[f.DeviceRecord]:
        """Our account's devices as the server lists them (each noted in :meth:`device_labels`
        from its first listing on)."""
        answer = await self.transport.request(
            lambda rid: f.ListDevices(rid=rid, account=self.account_id), f.Devices
        )
        DeviceLabels(self.core.store).seen(
            [r.keys.ed25519 for r in answer.devices], self.core._now_ms() // 1000
        )
        return answer.devices

    def device_labels(self) -> dict[str, Label]:
        """The names and first-seen days this profile keeps for our devices, by device ID."""
        return DeviceLabels(self.core.store).all()

    def name_device(self, device: str, name: str) -> Label:
        """Call one of our devices ``name`` in this profile (nothing goes to the server)."""
        return DeviceLabels(self.core.store).name(device, name, self.core._now_ms() // 1000)

    async def approve(self, code: str, *, name: str = "") -> str:
        """Admit the device that showed ``code``; return its device ID. ``name`` names it in
        this profile (checked first)."""
        if name:
            check_device_name(name)
        token, _, fingerprint = "".join(code.split()).partition("-")
        fingerprint = fingerprint.replace("-", "")
        if not token or not fingerprint:
            raise LocalProtocolError("a link code looks like 'token-fingerprint'")
        if not self.core.holds_identity:
            raise LocalProtocolError(
                "only the account's first device can approve devices: run this there"
            )
        info = await self.transport.request(
            lambda rid: f.LinkFetch(rid=rid, token=token), f.LinkInfo
        )
        record = self.core.approve(info.device, fingerprint)
        await self.transport.request(
            lambda rid: f.LinkApprove(rid=rid, token=token, device=record), f.Done
        )
        await self.refresh_devices(self.account_id)
        device = record.keys.ed25519
        labels = DeviceLabels(self.core.store)
        labels.seen([device], self.core._now_ms() // 1000)
        if name:
            labels.name(device, name, self.core._now_ms() // 1000)
        return device

    async def revoke(self, device: str) -> None:
        revocation = self.core.revocation(device)
        await self.transport.request(lambda rid: f.Revoke(rid=rid, revocation=revocation), f.Done)
        self.core.note_revoked(device)
        if device != self.core.device_id:
            await self.refresh_devices(self.account_id)

    async def safety_number(self, account: str | None = None) -> str:
        """The safety number of ``account``'s devices as we trust them (ours by default)."""
        account = account or self.account_id
        await self.refresh_devices(account)
        return self.core.safety_number(account)

    # ---- sending ------------------------------------------------------------------------------

    async def send(self, conversation: str, text: str, *, reply_to: bytes = b"") -> Message:
        """Encrypt to every device of the conversation's accounts and to our other devices, in
        one request; return once the server stored it all. ``reply_to`` (a message ID of the
        same conversation, see :meth:`quoted`) makes it a reply; UnknownReply otherwise.

        When the server cannot be reached (a TransportError), the message is kept in the
        outbox and :class:`NotSent` is raised: the next connect() sends it (see ``outbox.py``).
        What waits in the outbox goes before it."""
        self.sweep()
        payload = self._new_message(conversation, text, reply_to)
        try:
            await self.flush_outbox()
            await self._deliver(payload)
        except TransportError as exc:
            self.core.outbox.keep(payload, int(time.time() * 1000))
            # the cause's details go along: a close code (1001: the node drains) tells the
            # caller to reconnect at once rather than as after a connection lost
            raise NotSent(f"kept in the outbox ({exc.message})", **exc.details) from exc
        sent = self.core.record_sent(payload)
        # E.g. read receipts `kluis history` left in the profile. The message is stored by now:
        # a connection lost here must not read as a failed send (the caller would send it
        # again); the receipts stay in the profile for the next command.
        with suppress(TransportError):
            await self.flush_receipts()
        return sent

    def _new_message(self, conversation: str, text: str, reply_to: bytes = b"") -> Text | GroupText:
        if len(text.encode()) > MAX_TEXT_BYTES:
            raise LocalProtocolError(
                f"a message holds at most {MAX_TEXT_BYTES:,} bytes of text"
                f" ({len(text.encode()):,} given); send a longer text as a file (--file)"
            )
        if is_group_id(conversation):
            self.core.groups.current(conversation)  # refuses a group we are not in
            return self.core.new_group_text(conversation, text, reply_to)
        return self.core.new_text(conversation, text, reply_to)

    async def _deliver(self, payload: Text | GroupText) -> None:
        if isinstance(payload, GroupText):
            await self._send_group_payload(payload.to, payload)
        else:
            # The same payload goes to our own other devices: they file it under ``to``.
            await self._send_payloads({payload.to: payload, self.account_id: payload})

    def keep(self, conversation: str, text: str, *, reply_to: bytes = b"") -> None:
        """Put a new message straight into the outbox, offline (the server could not be
        reached at all); the next connect() sends it."""
        self.sweep()
        payload = self._new_message(conversation, text, reply_to)
        self.core.outbox.keep(payload, int(time.time() * 1000))

    def quoted(self, message: Message) -> Message | None:
        """The message ``message`` replies to, from this device's history of the same
        conversation only; None: not a reply, or a message we do not have."""
        return self.core.quoted(message)

    def outbox(self) -> list[Pending]:
        """What waits to be sent, oldest first."""
        return self.core.outbox.pending()

    async def flush_outbox(self) -> list[Message]:
        """Send what waits in the outbox, oldest first; return what went. One the server
        refuses is dropped, with why in :attr:`outbox_errors`; a lost connection keeps the
        rest (and raises). Not connected: nothing to do."""
        if self._transport is None or self._flushing:
            return []
        sent: list[Message] = []
        self._flushing = True
        try:
            for pending in self.core.outbox.pending():
                try:
                    await self._deliver(pending.payload)
                except TransportError:
                    raise
                except KluisError as exc:
                    self.core.outbox.done(pending.id)
                    self.outbox_errors.append((pending, exc))
                    continue
                with self.core.store.transaction():
                    sent.append(self.core.record_sent(pending.payload))
                    self.core.outbox.done(pending.id)
        finally:
            self._flushing = False
        return sent

    async def encrypt(
        self, account: str, payload: Payload, *, refresh: bool = False
    ) -> list[f.OutEnvelope]:
        """Envelopes of ``payload`` for every trusted device of ``account``, opening sessions."""
        await self._prepare(account, refresh=refresh, payload=payload)
        return self.core.encrypt(account, payload)

    async def _prepare(
        self, account: str, *, refresh: bool = False, payload: Payload | None = None
    ) -> None:
        """Know ``account``'s devices, and hold an Olm session with each; with ``payload``,
        refuse an account whose verification broke before claiming any of its keys."""
        if refresh or self.core.trusted_devices(account) is None:
            await self.refresh_devices(account)
        if payload is not None:
            self.core.check_verified(account, payload)
        missing = self.core.devices_without_session(account)
        if missing:
            bundles = await self.transport.request(
                _with_rid(f.ClaimKeys(rid=0, account=account, devices=missing)), f.Bundles
            )
            self.core.add_bundles(account, bundles.bundles)

    async def _send_payloads(self, payloads: dict[str, Payload]) -> None:
        """``payloads[account]`` to every trusted device of each account (our own device left
        out): one Send, or several when the envelopes exceed what one request may carry (a
        group change tells 1,000 members). When the server names accounts whose devices
        changed, fetch those accounts' device lists again and resend what it refused."""
        pending, stale = dict(payloads), set[str]()
        for attempt in range(_SEND_ATTEMPTS):
            parts: list[f.Addressed] = []
            for account, payload in pending.items():
                envelopes = await self.encrypt(account, payload, refresh=account in stale)
                if envelopes or account != self.account_id:  # we may have no other device
                    parts.append(f.Addressed(account=account, envelopes=envelopes))
            refused: set[str] = set()
            stale = set()
            for batch in _batches(parts):
                try:
                    await self.transport.request(_with_rid(f.Send(rid=0, to=batch)), f.Done)
                except MismatchedDevices as exc:
                    if attempt == _SEND_ATTEMPTS - 1:
                        raise
                    refused |= {part.account for part in batch}
                    stale |= set(exc.accounts) or {part.account for part in batch}
            if not refused:
                return
            pending = {account: payloads[account] for account in refused}

    # ---- groups -------------------------------------------------------------------------------

    def groups(self) -> list[GroupState]:
        return self.core.groups.all()

    def group(self, group: str) -> GroupState:
        state = self.core.groups.get(group)
        if state is None:
            raise LocalProtocolError(f"no group {group} on this device")
        return state

    async def create_group(self, name: str, members: list[str]) -> GroupState:
        """A new group of us and ``members``; every member device hears of it."""
        for account in members:
            await self._prepare(account)  # an unknown or untrusted member fails here, first
        state, update = self.core.groups.create(name, members)
        self.core.record_group_line(state.id, describe(update))
        await self._send_payloads({account: update for account in [*state.members]})
        return state

    async def change_group(
        self,
        group: str,
        action: Literal["rename", "add", "remove", "leave"],
        accounts: list[str] | None = None,
        name: str | None = None,
    ) -> GroupState:
        """Rename, add or remove members, or leave; the old and new members all hear of it."""
        for account in accounts or []:
            await self._prepare(account)
        state, update, audience = self.core.groups.change(group, action, accounts, name)
        self.core.record_group_line(group, describe(update))
        await self._send_payloads({account: update for account in {*audience, self.account_id}})
        return state

    async def send_group(self, group: str, text: str, *, reply_to: bytes = b"") -> Message:
        """One request: ``text`` encrypted once with our group session and sealed for every
        member device; devices that lack our session key get it over Olm first."""
        payload = self.core.new_group_text(group, text, reply_to)
        await self._send_group_payload(group, payload)
        return self.core.record_sent(payload)

    async def send_file(
        self,
        conversation: str,
        path: Path | str,
        caption: str = "",
        progress: attachments.Progress | None = None,
    ) -> Message:
        """Upload ``path`` encrypted (streamed) for every device of the conversation and our own
        other devices, then send its reference and key inside a message."""
        is_group = is_group_id(conversation)
        accounts = (
            self.core.groups.current(conversation).members
            if is_group
            else [conversation, self.account_id]
        )
        devices = 0
        for account in dict.fromkeys(accounts):
            await self._prepare(account)
            devices += len(self.core.sending_devices(account))
        if devices == 0:
            raise LocalProtocolError("no device to send the file to")
        ref = await self.upload_attachment(path, devices, progress)
        payload = self.core.new_file(conversation, ref, caption)
        if is_group:
            await self._send_group_payload(conversation, payload)
        else:
            await self._send_payloads({conversation: payload, self.account_id: payload})
        return self.core.record_sent(payload)

    async def fetch_files(
        self, folder: Path | str, progress: attachments.Progress | None = None
    ) -> list[Path]:
        """Save every received attachment not saved yet into ``folder``; return the paths."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        saved = []
        for received in self.core.unsaved_files():
            saved.append(await self.download_attachment(received.attachment, folder, progress))
            self.core.file_saved(received)
        return saved

    async def _send_group_payload(self, group: str, payload: GroupText | File) -> None:
        state = self.core.groups.current(group)
        stale: set[str] = set()
        for attempt in range(_SEND_ATTEMPTS):
            devices: dict[str, list[str]] = {}
            for account in state.members:
                await self._prepare(account, refresh=account in stale, payload=payload)
                devices[account] = self.core.sending_devices(account)
            key, lacking = self.core.groups.key_shares(group, devices)
            if lacking:
                await self._send_payloads({account: key for account in lacking})
                self.core.groups.shared(group, {a: devices[a] for a in lacking})
            parts = self.core.group_envelopes(group, payload, state.members)
            if not any(envelopes for _, envelopes in parts):
                break  # nobody else to tell (a group of our devices only)
            to = [
                f.Addressed(account=a, envelopes=e) for a, e in parts if e or a != self.account_id
            ]
            try:
                await self.transport.request(_with_rid(f.Send(rid=0, to=to)), f.Done)
                break
            except MismatchedDevices as exc:
                if attempt == _SEND_ATTEMPTS - 1:
                    raise
                stale = set(exc.accounts)

    # ---- receiving ----------------------------------------------------------------------------

    async def receive(
        self, wait: float = 0.0, *, until: int | None = None, settle: bool = True
    ) -> list[Message]:
        """Read everything queued for this device; with ``wait``, listen that long for more.

        With ``until``, return as soon as that many messages have arrived. With ``settle``
        False, the last batch's Ack and the housekeeping after it (:meth:`_settle`: broken
        sessions, receipts) are left to the caller, which shows the messages first: they are
        committed, and a redelivery of what was not acknowledged is dropped as a duplicate.
        """
        out: list[Message] = []
        self.errors = []
        self.sweep()
        transport = self.transport
        pushes = transport.pushes
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        try:
            while True:
                await self._ack()  # what the last push stored, before waiting for the next
                remaining = deadline - loop.time()
                if not self._synced:
                    remaining = max(remaining, _BACKLOG_TIMEOUT)  # the backlog is on its way
                elif remaining <= 0 and pushes.empty():
                    break
                try:
                    # Not wait_for: on 3.11 it can swallow a cancellation (Ctrl-C) that lands
                    # as a push arrives, and the command would go on waiting.
                    async with asyncio.timeout(max(0.0, remaining)):
                        push = await pushes.get()
                except TimeoutError:
                    break
                if push is None:
                    code = transport.close_code
                    why = "connection lost while receiving"
                    if code is not None:
                        why = f"connection closed by server while receiving ({code})"
                    raise TransportError(why, close_code=code)
                if isinstance(push, f.Synced):
                    self._synced = True
                elif isinstance(push, f.KeysLow):
                    await self._upload_keys(push.otk_count)
                else:
                    await self._handle_deliver(push.envelopes, out, defer_ack=not settle)
                    if until is not None and len(out) >= until and self._synced:
                        break
            if settle:
                await self._settle()
        except TransportError:
            # Messages in ``out`` are decrypted and stored, so a redelivery is seen as a
            # duplicate and never shown: hand them over now; the next call raises.
            if not out:
                raise
            pushes.put_nowait(None)
        return out

    async def _settle(self) -> None:
        """After a batch: acknowledge it, open fresh sessions where one broke, and send the
        receipts it queued (one per conversation for the whole batch; they wait in the profile
        until sent)."""
        await self._ack()
        await self._recover_sessions()
        await self.flush_receipts()

    async def messages(self) -> AsyncIterator[Message]:
        """Every incoming message, as it arrives, forever."""
        while True:
            for m in await self.receive(wait=3600, until=1):  # hand over each batch at once
                yield m

    async def events(self) -> AsyncIterator[Event]:
        """Everything the application should know, as it happens (see ``client/events.py``).

        Connects if needed and starts with :class:`ConnectionUp`; ends after
        :class:`ConnectionDown` (then ``connect()`` and ``events()`` again to go on).
        """
        try:
            await self.connect()
        except TransportError as exc:
            yield ConnectionDown(str(exc), _close_code(exc))
            return
        yield ConnectionUp()
        reported: set[str] = set()
        flows = self._flow_states
        machine = self.core.verification
        while True:
            for alarm in self.alarms():
                if alarm not in reported:
                    reported.add(alarm)
                    yield DeviceAlarm(alarm)
            # A verification under way is answered promptly: its messages are no Message
            # that would end the wait. The batch is stored and acknowledged when receive()
            # returns: it is shown before the housekeeping (receipts, session repair, the
            # verification answers) that needs round trips of its own.
            wait = _VERIFY_POLL_S if machine.active() else _EVENT_POLL_S
            try:
                messages = await self.receive(wait=wait, until=1, settle=False)
            except TransportError as exc:
                yield await self._down(exc)
                return
            for error in self.errors:
                sender, device = error.details.get("sender", ""), error.details.get("device", "")
                yield Undecryptable(error.code, str(error), str(sender), str(device))
            for message in messages:
                yield MessageReceived(message)
            try:
                await self._settle()
                machine.expire()
                await self._flush_verifications_quietly()
            except TransportError as exc:
                yield await self._down(exc)
                return
            self.sweep()  # disappearing messages go while the loop runs, about once a second
            for event in self.core.features.drain():
                yield event
            for peer in machine.take_requests():
                yield VerificationRequested(peer)
            for flow in machine.views():
                latest = machine.current(flow.peer)
                if latest is None or latest.txn != flow.txn:
                    continue  # replaced (a crossing request won): its end is no news
                if flows.get(flow.txn) is not flow.state:
                    flows[flow.txn] = flow.state
                    yield VerificationChanged(flow)

    async def _down(self, exc: TransportError) -> ConnectionDown:
        """The connection is lost: drop the transport; the event that ends ``events()``."""
        transport, self._transport = self._transport, None
        if transport is not None:
            await transport.close()
        return ConnectionDown(str(exc), _close_code(exc))

    async def _ack(self) -> None:
        """Acknowledge the envelopes stored and not yet acknowledged (the server deletes them)."""
        if self._unacked:
            ids, self._unacked = self._unacked, []
            await self.transport.request(lambda rid: f.Ack(rid=rid, ids=ids), f.Done)

    async def _handle_deliver(
        self, envelopes: list[f.InEnvelope], out: list[Message], *, defer_ack: bool = False
    ) -> None:
        """Decrypt and store a Deliver push, then ack it.

        Envelopes from devices we know need no network: a run of them is read in one
        transaction (one durable commit, see ``ClientCore.batch``), where a bad one is rolled
        back alone and quarantined. An envelope from a device we do not know yet needs a device
        list from the server: it is read on its own, outside any transaction (none stays open
        across an await: a send from this client meanwhile must commit before it goes on the
        wire). Messages reach ``out`` once committed (so a lost connection keeps what was read);
        the Ack goes out after the last commit (with ``defer_ack``, from :meth:`_ack` later).
        """
        ack: list[int] = []
        i = 0
        while i < len(envelopes):
            read: list[Message] = []
            unknown: Opened | None = None
            # A push of one (a live conversation) needs no savepoint: its own transaction.
            with self.core.batch() if len(envelopes) > 1 else nullcontext():
                while i < len(envelopes) and unknown is None:
                    unknown = self._read_known(envelopes[i], read)
                    if unknown is None:
                        ack.append(envelopes[i].id)
                        i += 1
            out.extend(read)
            if unknown is not None:
                env = envelopes[i]
                try:
                    message = await self._read_unknown(unknown)
                except TransportError:
                    raise  # not acknowledged: the server delivers it again
                except Exception as exc:  # fail closed, whatever the reason: keep it aside, ack it
                    self._quarantine(env, exc, unknown.sealed)
                else:
                    if message is not None:
                        out.append(message)
                ack.append(env.id)
                i += 1
        self._unacked.extend(ack)
        if not defer_ack:
            await self._ack()

    def _quarantine(self, env: f.InEnvelope, exc: Exception, claimed: Sealed | None = None) -> None:
        """Keep ``env`` aside; report why, and who it claims to come from when the seal opened
        (``sender`` and ``device`` in the error's details: a claim, not a proof)."""
        self.core.quarantine(env, exc)
        error = (
            exc
            if isinstance(exc, KluisError)
            else DecryptionError(f"unreadable envelope ({type(exc).__name__})")
        )
        if claimed is not None:
            error.details.setdefault("sender", claimed.account)
            error.details.setdefault("device", claimed.device)
        self.errors.append(error)

    def _read_known(self, env: f.InEnvelope, read: list[Message]) -> Opened | None:
        """Read ``env`` into ``read``, or quarantine it; return it opened, unread, if it claims
        a device we do not know yet (that takes a request: see :meth:`_read_unknown`)."""
        if is_announcement(env.body):
            try:  # signed by the pinned operator key, for this server, never seen before
                a = operator.check_announcement(self.core.store, self.core.server, env.body)
                read.append(operator.store_announcement(self.core.store, a))
            except Exception as exc:  # fail closed: kept aside, counted, acknowledged
                self._quarantine(env, exc)
            return None
        opened: Opened | None = None
        try:
            opened = self.core.open_envelope(env)
            if opened is None:
                return None
            s = opened.sealed
            if not self.core.knows_device(s.account, s.device):
                return opened
            try:
                message = self.core.decrypt(opened)
            except DecryptionError:
                if s.type != MEGOLM:  # a group session is not an Olm session to repair
                    self.core.mark_session_broken(s.account, s.device)
                raise
        except Exception as exc:  # fail closed, whatever the reason: keep it aside, ack it
            self._quarantine(env, exc, opened.sealed if opened is not None else None)
            return None
        if message is not None:
            read.append(message)
        return None

    async def _read_unknown(self, opened: Opened) -> Message | None:
        # Nothing goes on the wire for a claim until its Olm message has decrypted to us.
        self.core.precheck(opened)
        await self.refresh_devices(opened.sealed.account)
        return self.core.decrypt(opened)

    async def _recover_sessions(self) -> None:
        """Open fresh sessions to devices whose session broke, with a message they ignore:
        only for devices we trust, never at once, at most once an hour per device."""
        for account in self.core.due_recoveries():
            try:
                await self._send_payloads({account: self.core.new_dummy(account)})
            except TransportError:
                raise
            except KluisError:
                continue  # tried; due_recoveries() will not offer it again this hour

    def history(self, conversation: str | None = None) -> list[Message]:
        self.sweep()
        return self.core.history(conversation)

    # ---- attachments --------------------------------------------------------------------------

    async def upload_attachment(
        self,
        path: Path | str,
        recipients: int,
        progress: attachments.Progress | None = None,
        *,
        mime: str = "",
    ) -> AttachmentRef:
        """Encrypt the file at ``path`` under a fresh key and upload it for ``recipients``
        devices (every device that will fetch it: the peers' and our own other ones); return
        the reference to send them inside a message. Streamed: the file is never whole in
        memory. Refused before any byte is sent when over the server's size limit or quota."""
        return await attachments.upload(
            self.transport, self.core.server, Path(path), recipients, progress, mime=mime
        )

    async def download_attachment(
        self,
        ref: AttachmentRef,
        out_path: Path | str,
        progress: attachments.Progress | None = None,
    ) -> Path:
        """Fetch, decrypt and verify ``ref`` into ``out_path`` (a file, or a folder to save it
        in under its sanitised name); return the path written. The target appears only once
        the whole file has checked out; the server then counts this device's fetch."""
        return await attachments.download(
            self.transport, self.core.server, ref, Path(out_path), progress
        )

    async def attachment_bytes(self, ref: AttachmentRef, limit: int) -> bytes:
        """Fetch, decrypt and verify ``ref`` into memory, at most ``limit`` bytes (a preview);
        the server is not told this device has it, so it stays there to be saved."""
        return await attachments.download_bytes(self.transport, self.core.server, ref, limit)

    # ---- messaging features (issue 9; the rules live in the core's modules) ------------------

    def sweep(self) -> int:
        """Delete the disappearing messages whose time has come, and scrub the profile of
        them; returns how many went. Every operation of this client sweeps first."""
        gone = self.core.features.timers.sweep()
        if gone:
            self.core.store.scrub()
        return len(gone)

    async def _sync_own(self, payload: Payload) -> None:
        """To our own other devices only (contacts, notes)."""
        if self._transport is not None:
            await self._send_payloads({self.account_id: payload})

    def contacts(self) -> dict[str, str]:
        """Nicknames by account ID."""
        return self.core.features.contacts.all()

    def contact_name(self, account: str) -> str:
        return self.core.features.contacts.name(account)

    async def set_contact(self, account: str, name: str, *, rename: bool | None = None) -> None:
        """Name ``account`` here and on our other devices (see ``Contacts.set``)."""
        await self._sync_own(self.core.features.contacts.set(account, name, rename=rename))

    def notes(self) -> list[Note]:
        return self.core.features.notes.list()

    async def add_note(self, text: str) -> str:
        """Write a note here and on our other devices; returns its short ID."""
        payload = self.core.features.notes.add(text)
        await self._sync_own(payload)
        return payload.note

    async def delete_note(self, note: str) -> None:
        await self._sync_own(self.core.features.notes.delete(note))

    def timers(self) -> dict[str, int]:
        """The disappearing-message timer (seconds) of each conversation that has one on."""
        return self.core.features.timers.all()

    async def set_timer(self, conversation: str, seconds: int) -> Message:
        """Set the conversation's disappearing-message timer (0: off) for every member and our
        other devices; returns the system line filed in history."""
        self.sweep()
        payload = self.core.features.timers.new(conversation, seconds)
        await self._send_payloads({account: payload for account in self._audience(conversation)})
        return self.core.features.timers.record_sent(payload)

    def _audience(self, conversation: str) -> list[str]:
        """The accounts a payload about ``conversation`` goes to, our own included."""
        if is_group_id(conversation):
            return self.core.groups.current(conversation).members
        return [conversation, self.account_id]

    def set_read_receipts(self, on: bool) -> None:
        """Send read receipts (default) or not; delivered receipts are always sent."""
        self.core.features.receipts.set_read_enabled(on)

    def conversations(self) -> list[ConversationInfo]:
        """Every conversation with a stored message, most recent first, with unread counts."""
        self.sweep()
        return self.core.features.conversations.list()

    async def mark_read(self, conversation: str | None = None) -> int:
        """The user read ``conversation`` (all when None): queue read receipts (when on) and
        send them if connected (else with the next connected operation)."""
        count = self.core.features.conversations.mark_read(conversation)
        if self._transport is not None:
            await self.flush_receipts()
        return count

    async def flush_receipts(self) -> None:
        """Send the receipts waiting in the profile. One an account refuses is dropped (a
        receipt is a courtesy: it must not wedge anything); a lost connection keeps the rest."""
        async with self._receipts_lock:
            await self._flush_receipts()

    async def _flush_receipts(self) -> None:
        receipts = self.core.features.receipts
        for pending, payloads in receipts.pending():
            try:
                for payload in payloads:
                    await self._send_payloads({pending.account: payload})
            except TransportError:
                raise
            except KluisError:
                pass
            receipts.sent(pending)

    # ---- verification (SAS) -------------------------------------------------------------------

    async def verify(
        self,
        peer: str,
        confirm: Callable[[Verification], Awaitable[bool]],
        *,
        timeout: float = 600.0,
        poll: float = 0.2,
    ) -> Verification:
        """Verify ``peer`` interactively with one of its devices (its user runs this too).

        Answers a request ``peer`` already sent, or sends one and waits. Once both sides have
        the short code, ``confirm`` shows it to the user and returns whether it matches what the
        peer's screen shows. Returns the verified flow; raises VerificationFailed on a "no" (on
        either side), a MAC or commitment that fails, a cancel, or the timeout. Messages that
        arrive meanwhile are stored in the history as usual.
        """
        machine = self.core.verification
        await self.refresh_devices(peer)
        await self.receive()  # the backlog: a request the peer sent may be waiting in it
        flow = machine.begin(peer)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        asked: set[bytes] = set()
        try:
            while True:
                machine.expire()
                await self._flush_verifications()
                flow = machine.current(peer) or flow
                if flow.state is State.VERIFIED:
                    return flow
                if flow.state is State.CANCELLED:
                    raise VerificationFailed(f"verification with {peer} failed: {flow.reason}")
                if flow.state is State.COMPARING and flow.txn not in asked:
                    asked.add(flow.txn)
                    machine.confirm(flow.txn, await confirm(flow))
                    continue
                if loop.time() >= deadline:
                    machine.cancel(flow.txn, "timed out")
                    await self._flush_verifications()
                    raise VerificationFailed(f"verification with {peer} timed out")
                await self.receive(wait=poll)
        except (asyncio.CancelledError, KeyboardInterrupt):
            machine.cancel(flow.txn)  # best effort: tell the peer on the next flush
            raise

    # The same flows, driven by an application that follows events() (the app): no second
    # reader of the connection. events() sends what the flows answer and reports each change
    # (VerificationRequested, VerificationChanged); these are the user's acts.

    async def start_verification(self, peer: str) -> Verification:
        """Answer ``peer``'s waiting request, or ask ``peer``; follow it with events()."""
        await self.refresh_devices(peer)
        flow = self.core.verification.begin(peer)
        await self._flush_verifications()
        return flow

    async def confirm_verification(self, txn: bytes, match: bool) -> Verification:
        """The user compared the short code of flow ``txn``: ``match`` or not (cancels)."""
        flow = self.core.verification.confirm(txn, match)
        await self._flush_verifications()
        return flow

    async def cancel_verification(self, txn: bytes) -> None:
        """The user gave flow ``txn`` up; the peer is told."""
        self.core.verification.cancel(txn)
        await self._flush_verifications()

    def verification_status(self, peer: str) -> tuple[Status, str]:
        """Whether ``peer`` is verified; for a broken verification, why (offline)."""
        return self.core.verification.status(peer)

    async def _flush_verifications_quietly(self) -> None:
        """events(): send what the flows answered to what arrived. A refusal other than a lost
        connection must not end the stream: the flows under way end, cancelled with why (the
        application hears of it as VerificationChanged)."""
        try:
            await self._flush_verifications()
        except TransportError:
            raise
        except KluisError as exc:
            machine = self.core.verification
            for flow in machine.views():
                machine.cancel(flow.txn, f"could not send ({exc.code})")
            with suppress(KluisError):  # tell the peer, best effort
                await self._flush_verifications()

    async def _flush_verifications(self) -> None:
        """Send what the verification flows queued, each to every device of its account."""
        for account, payload in self.core.verification.take_outbox():
            await self._send_payloads({account: payload})
