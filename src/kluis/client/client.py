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
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import msgspec

from kluis.client.core import ClientCore, Message, Opened, Payload, link_fingerprint
from kluis.client.events import (
    ConnectionDown,
    ConnectionUp,
    DeviceAlarm,
    Event,
    MessageReceived,
    Undecryptable,
)
from kluis.client.store import ProfileStore
from kluis.client.transport import Transport, TransportFactory, WebSocketTransport
from kluis.crypto.profile_key import KdfParams
from kluis.errors import (
    DecryptionError,
    KluisError,
    LocalProtocolError,
    MalformedFrame,
    MismatchedDevices,
    TransportError,
    UnknownDevice,
)
from kluis.identity.chain import ChainView
from kluis.protocol import frames as f
from kluis.protocol.signing import origin

_SEND_ATTEMPTS = 3
F = TypeVar("F", bound=f.ClientFrame)


def _with_rid(frame: F) -> Callable[[int], F]:
    return lambda rid: msgspec.structs.replace(frame, rid=rid)


_BACKLOG_TIMEOUT = 10.0
# events() listens this long per receive(): an unreadable envelope is reported within it.
_EVENT_POLL_S = 1.0


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


class KluisClient:
    def __init__(
        self, core: ClientCore, *, transport_factory: TransportFactory = WebSocketTransport
    ) -> None:
        self.core = core
        self._dial = transport_factory  # makes the transport to a server URL (tests: in memory)
        self._transport: Transport | None = None
        self.errors: list[KluisError] = []  # why envelopes of the last receive() were unreadable
        self._synced = False  # the server has sent this connection's stored backlog

    # ---- opening ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        profile: Path,
        passphrase: str,
        *,
        transport_factory: TransportFactory = WebSocketTransport,
    ) -> KluisClient:
        """Unlock an existing profile (no network yet)."""
        store = ProfileStore.open(profile, passphrase)
        core = ClientCore.load(store, clock=time.time, random=secrets.token_bytes)
        return cls(core, transport_factory=transport_factory)

    @classmethod
    async def register(
        cls,
        server: str,
        licence: str,
        profile: Path,
        passphrase: str,
        *,
        transport_factory: TransportFactory = WebSocketTransport,
        kdf: KdfParams | None = None,
    ) -> KluisClient:
        """Create a profile, redeem ``licence`` and publish this device's keys.

        ``kdf`` overrides the profile's argon2id parameters (benchmarks lower them)."""
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
        client._transport = transport
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
        transport_factory: TransportFactory = WebSocketTransport,
        kdf: KdfParams | None = None,
    ) -> str:
        """Create a profile for a new device and ask to join an account; return the link code.

        With ``account`` (the ID the user means to join), this device refuses any other account
        the server may later put it in. ``kdf`` as for :meth:`register`.
        """
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
            welcome = await transport.request(
                lambda rid: f.Auth(
                    rid=rid,
                    device=self.core.device_id,
                    sig=self.core.sign_challenge(nonce, transport.server_origin),
                ),
                f.Welcome,
            )
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
        try:
            await self._upload_keys(welcome.otk_count)
            # Every connection checks our own account's devices: one the identity did not
            # certify is an alarm (see alarms()), and this device must itself be certified.
            await self.refresh_devices(self.account_id)
        except BaseException:
            self._transport = None
            await transport.close()
            raise

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
        answer = await self.transport.request(
            lambda rid: f.ListDevices(rid=rid, account=self.account_id), f.Devices
        )
        return answer.devices

    async def approve(self, code: str) -> str:
        """Admit the device that showed ``code``; return its device ID."""
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
        return record.keys.ed25519

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

    async def send(self, peer: str, text: str) -> Message:
        """Encrypt to every device of ``peer`` and to our other devices; return once stored."""
        payload = self.core.new_text(peer, text)
        await self._send_payload(peer, payload)
        sent = self.core.record_sent(peer, payload)
        await self._send_payload(self.account_id, self.core.sync_copy(payload))
        return sent

    async def encrypt(
        self, account: str, payload: Payload, *, refresh: bool = False
    ) -> list[f.OutEnvelope]:
        """Envelopes of ``payload`` for every trusted device of ``account``, opening sessions."""
        if refresh or self.core.trusted_devices(account) is None:
            await self.refresh_devices(account)
        missing = self.core.devices_without_session(account)
        if missing:
            bundles = await self.transport.request(
                _with_rid(f.ClaimKeys(rid=0, account=account, devices=missing)), f.Bundles
            )
            self.core.add_bundles(account, bundles.bundles)
        return self.core.encrypt(account, payload)

    async def _send_payload(self, account: str, payload: Payload) -> None:
        for attempt in range(_SEND_ATTEMPTS):
            envelopes = await self.encrypt(account, payload, refresh=attempt > 0)
            if not envelopes and account == self.account_id:
                return  # we have no other device
            try:
                await self.transport.request(
                    _with_rid(f.Send(rid=0, account=account, envelopes=envelopes)), f.Done
                )
                return
            except MismatchedDevices:
                if attempt == _SEND_ATTEMPTS - 1:
                    raise

    # ---- receiving ----------------------------------------------------------------------------

    async def receive(self, wait: float = 0.0, *, until: int | None = None) -> list[Message]:
        """Read everything queued for this device; with ``wait``, listen that long for more.

        With ``until``, return as soon as that many messages have arrived.
        """
        out: list[Message] = []
        self.errors = []
        pushes = self.transport.pushes
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        try:
            while True:
                remaining = deadline - loop.time()
                if not self._synced:
                    remaining = max(remaining, _BACKLOG_TIMEOUT)  # the backlog is on its way
                elif remaining <= 0 and pushes.empty():
                    break
                try:
                    push = await asyncio.wait_for(pushes.get(), max(0.0, remaining))
                except TimeoutError:
                    break
                if push is None:
                    raise TransportError("connection lost while receiving")
                if isinstance(push, f.Synced):
                    self._synced = True
                elif isinstance(push, f.KeysLow):
                    await self._upload_keys(push.otk_count)
                else:
                    await self._handle_deliver(push.envelopes, out)
                    if until is not None and len(out) >= until and self._synced:
                        break
            await self._recover_sessions()
        except TransportError:
            # Messages in ``out`` are decrypted and stored, so a redelivery is seen as a
            # duplicate and never shown: hand them over now; the next call raises.
            if not out:
                raise
            pushes.put_nowait(None)
        return out

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
            yield ConnectionDown(str(exc))
            return
        yield ConnectionUp()
        reported: set[str] = set()
        while True:
            for alarm in self.alarms():
                if alarm not in reported:
                    reported.add(alarm)
                    yield DeviceAlarm(alarm)
            try:
                messages = await self.receive(wait=_EVENT_POLL_S, until=1)
            except TransportError as exc:
                transport, self._transport = self._transport, None
                if transport is not None:
                    await transport.close()
                yield ConnectionDown(str(exc))
                return
            for error in self.errors:
                yield Undecryptable(error.code, str(error))
            for message in messages:
                yield MessageReceived(message)

    async def _handle_deliver(self, envelopes: list[f.InEnvelope], out: list[Message]) -> None:
        """Decrypt into ``out`` as we go (so a lost connection keeps what was read), then ack."""
        ack: list[int] = []
        for env in envelopes:
            try:
                message = await self._decrypt(env)
            except TransportError:
                raise  # not acknowledged: the server delivers it again
            except Exception as exc:  # fail closed, whatever the reason: keep it aside, ack it
                self.core.quarantine(env, exc)
                if isinstance(exc, KluisError):
                    self.errors.append(exc)
                else:
                    self.errors.append(
                        DecryptionError(f"unreadable envelope ({type(exc).__name__})")
                    )
            else:
                if message is not None:
                    out.append(message)
            ack.append(env.id)
        if ack:
            await self.transport.request(lambda rid: f.Ack(rid=rid, ids=ack), f.Done)

    async def _decrypt(self, env: f.InEnvelope) -> Message | None:
        opened: Opened | None = self.core.open_envelope(env)
        if opened is None:
            return None
        s = opened.sealed
        if not self.core.knows_device(s.account, s.device):
            # Nothing goes on the wire for a claim until its Olm message has decrypted to us.
            self.core.precheck(opened)
            await self.refresh_devices(s.account)
            return self.core.decrypt(opened)
        try:
            return self.core.decrypt(opened)
        except DecryptionError:
            self.core.mark_session_broken(s.account, s.device)
            raise

    async def _recover_sessions(self) -> None:
        """Open fresh sessions to devices whose session broke, with a message they ignore:
        only for devices we trust, never at once, at most once an hour per device."""
        for account in self.core.due_recoveries():
            try:
                await self._send_payload(account, self.core.new_dummy(account))
            except TransportError:
                raise
            except KluisError:
                continue  # tried; due_recoveries() will not offer it again this hour

    def history(self, peer: str | None = None) -> list[Message]:
        return self.core.history(peer)
