"""The client's sans-IO core: identity, the device chain, Olm sessions, sealing and history.

Theory of operation: :class:`ClientCore` never touches the network. The async client asks it for
what to send (signed device keys, one-time keys to upload, envelopes for a message) and feeds it
what arrived (device lists, key bundles, envelopes). Each state change is written to the
encrypted profile in one transaction *before* the result is handed back, so nothing goes on the
wire that the profile could forget.

Devices: an account is its identity key, and its ID is derived from that key
(``kluis.identity.chain``). A device is used only when the identity certified it and it was
never seen revoked; a device list with anything else makes sending to that account stop with
:class:`UntrustedDevice`, and on our own account raises an alarm (:meth:`ClientCore.alarms`).

Receiving an envelope takes steps so that the transport can fetch a device list between them,
and so that a forged sender claim costs the recipient nothing: :meth:`open_envelope` (replay
check, unsealing: who claims to have sent it); for a device we do not know yet,
:meth:`precheck` decrypts the pre-key message on a throwaway copy of our Olm account and checks
the payload names this claim and us, all before any network request; then :meth:`decrypt`
(Olm, binding checks, deduplication, history). An envelope that fails anywhere is
acknowledged and quarantined (:meth:`quarantine`): kept encrypted, counted, never retried by
itself. Several envelopes may share one transaction (:meth:`batch`): then the caller
acknowledges them only once it has committed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import msgspec

from kluis.client.features import Features
from kluis.client.groups import GroupBook, is_group_id
from kluis.client.outbox import Outbox
from kluis.client.records import (
    ContactSync,
    Dummy,
    Identity,
    Message,
    NoteSync,
    Opened,
    Payload,
    Pins,
    Quarantined,
    Receipt,
    ReceivedFile,
    Sealed,
    StoredMessage,
    Sync,
    Text,
    Timer,
    clamp_ts,
)
from kluis.client.store.protocol import ClientStore
from kluis.client.verification import VERIFY_KINDS, Verifications
from kluis.crypto import padding, seal
from kluis.crypto.account_key import AccountKey
from kluis.crypto.olm import PRE_KEY, OlmAccount, OlmSession, verify_signature
from kluis.errors import (
    BadSignature,
    DecryptionError,
    KluisError,
    LocalProtocolError,
    UnknownReply,
    UntrustedDevice,
)
from kluis.identity import chain
from kluis.identity.chain import link_fingerprint
from kluis.protocol import signing
from kluis.protocol.attachment import AttachmentRef
from kluis.protocol.frames import (
    Bundle,
    DeviceKeys,
    DeviceRecord,
    InEnvelope,
    OutEnvelope,
    Revocation,
    SignedKey,
)
from kluis.protocol.operator import WipeOrder, wipe_message
from kluis.protocol.payload import (
    MESSAGE_ID_BYTES,
    File,
    GroupKey,
    GroupText,
    GroupUpdate,
    VerifyAccept,
    VerifyCancel,
    VerifyDone,
    VerifyKey,
    VerifyMac,
    VerifyRequest,
)

__all__ = [
    "ClientCore",
    "Clock",
    "Dummy",
    "Message",
    "Opened",
    "Payload",
    "Random",
    "Sealed",
    "Sync",
    "Text",
    "link_fingerprint",
]

Clock = Callable[[], float]  # seconds since the epoch (time.time)
Random = Callable[[int], bytes]  # n random bytes from a CSPRNG (secrets.token_bytes)

ONE_TIME_KEY_TARGET = 50
MEGOLM = 2  # Sealed.type of a group message (Olm's are PRE_KEY 0 and NORMAL 1)
# A peer's clock is not ours: what it says is shown at most this far ahead of our own.
MAX_CLOCK_SKEW_MS = 5 * 60 * 1000
# Session recovery (a fresh session and a dummy message after an undecryptable message): never
# at once, at most once an hour per peer device, and only for devices we already trust.
RECOVERY_DELAY_MS = 30 * 1000
RECOVERY_INTERVAL_MS = 3600 * 1000
RECOVERY_FORGET_MS = 7 * 24 * 3600 * 1000
# Unreadable envelopes kept whole in the profile (for a later version to retry); more are counted.
QUARANTINE_KEEP = 1_000


_enc = msgspec.msgpack.Encoder()
_identity_dec = msgspec.msgpack.Decoder(Identity)
_pins_dec = msgspec.msgpack.Decoder(Pins)
_payload_dec: msgspec.msgpack.Decoder[Payload] = msgspec.msgpack.Decoder(Payload)
_sealed_dec = msgspec.msgpack.Decoder(Sealed)
_stored_dec = msgspec.msgpack.Decoder(StoredMessage)
_file_dec = msgspec.msgpack.Decoder(ReceivedFile)
_broken_dec = msgspec.msgpack.Decoder(dict[str, tuple[int, int]])


def _peer(account: str, device: str) -> str:
    """Sessions are kept per account and device, never per Curve25519 key alone."""
    return f"{account}/{device}"


class ClientCore:
    """A device's state over a :class:`ClientStore`, with time and randomness injected.

    ``clock`` gives seconds since the epoch (``time.time``); ``random`` gives n bytes from a
    cryptographically secure source (``secrets.token_bytes``). Key generation inside vodozemac
    and ``cryptography`` draws from the system's source directly.
    """

    def __init__(
        self, store: ClientStore, identity: Identity, *, clock: Clock, random: Random
    ) -> None:
        self.store = store
        self._identity = identity
        self._account = OlmAccount.from_pickle(identity.account_pickle, store.pickle_key)
        self._seal = seal.SealKeyPair.from_private_bytes(identity.seal_private)
        self._account_key = (
            AccountKey.from_private_bytes(identity.account_key) if identity.account_key else None
        )
        self._clock = clock
        self._random = random
        self._pins_memo: dict[str, tuple[bytes, Pins]] = {}
        self.groups = GroupBook(
            store,
            account=lambda: self.account_id,
            device=self._account.ed25519,
            sign=lambda message: self._account.sign(message),
            now_ms=self._now_ms,
            random=random,
        )
        self.outbox = Outbox(store)  # messages that could not reach the server yet
        self.features = Features(self)  # contacts, notes, timers, receipts, conversation list
        # SAS flows (in memory: their ephemeral keys cannot be persisted) and verified accounts.
        self.verification = Verifications(store, self, clock_ms=self._now_ms, random=random)

    # ---- identity -----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        store: ClientStore,
        server: str,
        *,
        clock: Clock,
        random: Random,
        new_account: bool = False,
    ) -> ClientCore:
        """A new device; with ``new_account``, also the identity key of a new account."""
        account = OlmAccount()
        identity = Identity(
            account_pickle=account.pickle(store.pickle_key),
            seal_private=seal.SealKeyPair().private_bytes(),
            server=server,
        )
        if new_account:
            identity.account_key = AccountKey().private_bytes()
        store.put("identity", _enc.encode(identity))
        return cls(store, identity, clock=clock, random=random)

    @classmethod
    def load(cls, store: ClientStore, *, clock: Clock, random: Random) -> ClientCore:
        raw = store.get("identity")
        if raw is None:
            raise LocalProtocolError("profile has no identity")
        return cls(store, _identity_dec.decode(raw), clock=clock, random=random)

    def _save_identity(self) -> None:
        self._identity.account_pickle = self._account.pickle(self.store.pickle_key)
        self.store.put("identity", _enc.encode(self._identity))

    @property
    def server(self) -> str:
        return self._identity.server

    @property
    def account_id(self) -> str:
        return self._identity.account_id

    @property
    def device_id(self) -> str:
        return self._account.ed25519

    @property
    def link_token(self) -> str:
        return self._identity.link_token

    @property
    def holds_identity(self) -> bool:
        """True on the account's first device: the only one that can certify or revoke others."""
        return self._account_key is not None

    @property
    def identity_key(self) -> str:
        """Our account's identity key (from the key itself, or as pinned)."""
        if self._account_key is not None:
            return self._account_key.public
        pins = self._pins(self.account_id) if self.account_id else None
        if pins is None:
            raise LocalProtocolError("this device has not seen its account's identity yet")
        return pins.identity

    def new_account_id(self) -> str:
        """The ID our identity key stands for (the first device, before registering)."""
        return chain.account_id_for(self._need_account_key().public)

    def _need_account_key(self) -> AccountKey:
        if self._account_key is None:
            raise LocalProtocolError(
                "only the account's first device holds its identity key: do this there"
            )
        return self._account_key

    def set_account(self, account_id: str) -> None:
        if self._identity.account_id and self._identity.account_id != account_id:
            raise LocalProtocolError("server reports a different account for this device")
        if self._account_key is not None and chain.account_id_for(self._account_key.public) != (
            account_id
        ):
            raise LocalProtocolError("server reports an account that is not our identity's")
        if self._identity.account_id == account_id and not self._identity.link_token:
            return
        self._identity.account_id, self._identity.link_token = account_id, ""
        self._save_identity()

    def set_link_token(self, token: str) -> None:
        self._identity.link_token = token
        self._save_identity()

    def device_keys(self) -> DeviceKeys:
        ed, curve, sealing = self._account.ed25519, self._account.curve25519, self._seal.public
        sig = self._account.sign(signing.device_keys_message(ed, curve, sealing))
        return DeviceKeys(ed25519=ed, curve25519=curve, seal=sealing, sig=sig)

    def own_record(self) -> DeviceRecord:
        """This device, certified by our identity (the first device, at registration)."""
        return chain.certify(self._need_account_key(), self.new_account_id(), self.device_keys())

    def sign_challenge(self, nonce: bytes, server: str) -> str:
        return self._account.sign(signing.challenge_message(nonce, self.device_id, server))

    def approve(self, keys: DeviceKeys, fingerprint: str) -> DeviceRecord:
        """Certify ``keys`` as a new device of our account, once the link code matches them."""
        key = self._need_account_key()
        if link_fingerprint(keys) != fingerprint.lower():
            raise BadSignature("link code does not match the requesting device's keys")
        chain.check_device_keys(keys)
        return chain.certify(key, self.account_id, keys)

    def revocation(self, device: str) -> Revocation:
        """A signed revocation: by our identity, or by this device for itself."""
        if self._account_key is not None:
            return chain.revoke(self._account_key, self.account_id, device)
        if device != self.device_id:
            raise LocalProtocolError(
                "only the account's first device can revoke other devices; "
                "this device can revoke itself"
            )
        sig = self._account.sign(signing.revocation_message(self.account_id, device))
        return Revocation(device=device, sig=sig, by_self=True)

    def sign_wipe(self, device: str, server: str, now: int) -> WipeOrder:
        """An order, signed by our identity, that ``device`` of our account erase itself."""
        order = WipeOrder(
            account=self.account_id, device=device, server=server, issued_at=now, by="owner"
        )
        sig = self._need_account_key().sign(wipe_message(order))
        return WipeOrder(
            account=order.account,
            device=device,
            server=server,
            issued_at=now,
            by="owner",
            sig=sig,
        )

    # ---- one-time keys ------------------------------------------------------------------------

    def keys_to_upload(self, server_count: int) -> tuple[list[SignedKey], SignedKey | None]:
        """Generate keys up to the target; persisted now, marked published after the upload."""
        need = max(0, min(ONE_TIME_KEY_TARGET, self._account.max_one_time_keys // 2) - server_count)
        if need and not self._account.unpublished_one_time_keys():
            self._account.generate_one_time_keys(need)
        if not self._account.unpublished_fallback_key() and server_count == 0:
            self._account.generate_fallback_key()
        self._save_identity()
        sign = self._account.sign
        did = self.device_id

        def signed(kid: str, key: str) -> SignedKey:
            return SignedKey(
                key_id=kid, key=key, sig=sign(signing.one_time_key_message(did, kid, key))
            )

        otks = [signed(k, v) for k, v in self._account.unpublished_one_time_keys().items()]
        fb = [signed(k, v) for k, v in self._account.unpublished_fallback_key().items()]
        return otks, (fb[0] if fb else None)

    def keys_published(self) -> None:
        self._account.mark_keys_as_published()
        self._save_identity()

    # ---- device directory: the chain ----------------------------------------------------------

    def _pins_name(self, account: str) -> str:
        return "pins:" + self.store.blind(account).hex()

    def _pins(self, account: str) -> Pins | None:
        """Read-only: callers build a new Pins to change anything."""
        name = self._pins_name(account)
        raw = self.store.get(name)
        if not raw:
            return None
        # A store that caches hands back the same bytes while the record is unchanged: decode
        # each version once (a send reads the pins several times).
        memo = self._pins_memo.get(name)
        if memo is not None and memo[0] is raw:
            return memo[1]
        pins = _pins_dec.decode(raw)
        if len(self._pins_memo) >= 1024:
            self._pins_memo.clear()
        self._pins_memo[name] = (raw, pins)
        return pins

    def pinned(self, account: str) -> Pins | None:
        """What we pinned for ``account`` (its identity and devices), or None; read-only."""
        return self._pins(account)

    def _save_pins(self, pins: Pins) -> None:
        self.store.put(self._pins_name(pins.account), _enc.encode(pins))

    def accept_devices(
        self,
        account: str,
        identity: str,
        records: list[DeviceRecord],
        revocations: list[Revocation],
    ) -> chain.ChainView:
        """Take a device list from the server and keep what the account's identity certifies.

        Raises UntrustedDevice only when the list cannot be the account's at all (an identity
        key that is not the account's, or our own device missing from our account); devices the
        identity did not certify are recorded and refused (see :meth:`devices_for_sending`).
        """
        pins = self._pins(account)
        view = chain.evaluate(
            account,
            identity,
            records,
            revocations,
            pins.known if pins else {},
            frozenset(pins.revoked) if pins else frozenset(),
        )
        if account == self.account_id and self.device_id not in {
            r.keys.ed25519 for r in view.trusted
        }:
            raise UntrustedDevice("this device is not a certified device of its own account")
        known = dict(pins.known) if pins else {}
        known.update({r.keys.ed25519: r for r in view.trusted})
        self._save_pins(
            Pins(
                account=account,
                identity=identity,
                known=known,
                active=[r.keys.ed25519 for r in view.trusted],
                revoked=sorted(view.revoked),
                untrusted=view.untrusted,
            )
        )
        return view

    def note_revoked(self, device: str) -> None:
        """We revoked ``device`` of our own account: never take it back, whatever a server
        lists later (it may forget the revocation)."""
        pins = self._pins(self.account_id)
        if pins is None:
            return
        pins.revoked = sorted({*pins.revoked, device})
        pins.active = [d for d in pins.active if d != device]
        self._save_pins(pins)

    def trusted_devices(self, account: str) -> list[DeviceRecord] | None:
        """The active certified devices, or None if never fetched."""
        pins = self._pins(account)
        if pins is None:
            return None
        return [pins.known[d] for d in pins.active]

    def devices_for_sending(self, account: str) -> list[DeviceRecord]:
        """The devices to encrypt to; refuses an account whose list holds a device we cannot
        verify (the server expects an envelope for it: we will not write one)."""
        pins = self._pins(account)
        if pins is None:
            raise LocalProtocolError(f"no device list for {account} yet")
        if pins.untrusted:
            device, why = pins.untrusted[0]
            raise UntrustedDevice(
                f"{account} lists a device we refuse ({device[:8]}…: {why}); nothing is sent to it",
                account=account,
            )
        return [pins.known[d] for d in pins.active]

    def alarms(self) -> list[str]:
        """Devices listed in our own account that our identity did not certify."""
        pins = self._pins(self.account_id) if self.account_id else None
        if pins is None:
            return []
        return [f"device {d} in your account: {why}" for d, why in pins.untrusted]

    def safety_number(self, account: str) -> str:
        """Of the account's identity key; adding or revoking devices does not change it."""
        if account == self.account_id and self._account_key is not None:
            return chain.safety_number(account, self._account_key.public)
        pins = self._pins(account)
        if pins is None:
            raise LocalProtocolError(f"no device list for {account} yet")
        return chain.safety_number(account, pins.identity)

    def _device(self, account: str, device: str) -> DeviceRecord | None:
        pins = self._pins(account)
        if pins is None or device not in pins.active:
            return None
        return pins.known.get(device)

    def knows_device(self, account: str, device: str) -> bool:
        return self._device(account, device) is not None

    def device_status(self, record: DeviceRecord) -> str:
        """How our account's list shows ``record``: certified, or why it is refused."""
        pins = self._pins(self.account_id)
        if pins is not None:
            for device, why in pins.untrusted:
                if device == record.keys.ed25519:
                    return f"REFUSED: {why}"
        return "certified"

    # ---- Olm sessions -------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def devices_without_session(self, account: str) -> list[str]:
        broken = self._broken()
        return [
            d.keys.ed25519
            for d in self.devices_for_sending(account)
            if d.keys.ed25519 != self.device_id
            and (
                broken.get(_peer(account, d.keys.ed25519), (0, 0))[0] != 0
                or not self.store.sessions(_peer(account, d.keys.ed25519))
            )
        ]

    def _broken(self) -> dict[str, tuple[int, int]]:
        """Per peer device: (broken since, last recovery), in milliseconds."""
        raw = self.store.get("broken")
        return _broken_dec.decode(raw) if raw else {}

    def _save_broken(self, broken: dict[str, tuple[int, int]]) -> None:
        self.store.put("broken", _enc.encode(broken))

    def add_bundles(self, account: str, bundles: list[Bundle]) -> None:
        """Open outbound sessions from claimed keys, after checking every signature."""
        with self.store.transaction():
            broken = self._broken()
            for b in bundles:
                record = self._device(account, b.device.keys.ed25519)
                if record is None or record.keys != b.device.keys:
                    raise UntrustedDevice("claimed keys belong to a device we do not trust")
                k = b.one_time_key
                msg = signing.one_time_key_message(record.keys.ed25519, k.key_id, k.key)
                verify_signature(record.keys.ed25519, msg, k.sig)
                session = self._account.create_outbound_session(record.keys.curve25519, k.key)
                pickled = session.pickle(self.store.pickle_key).encode()
                peer = _peer(account, record.keys.ed25519)
                self.store.save_session(None, peer, pickled, self._now_ms())
                if peer in broken:
                    broken[peer] = (0, broken[peer][1])  # repaired; keep when we last tried
            self._save_broken(broken)

    def encrypt(self, account: str, payload: Payload) -> list[OutEnvelope]:
        """One sealed envelope per trusted device of ``account`` (ours excluded), each naming
        sender and recipient device inside the encryption."""
        self.check_verified(account, payload)
        devices = [d for d in self.devices_for_sending(account) if d.keys.ed25519 != self.device_id]
        out: list[OutEnvelope] = []
        if not devices:
            return out  # e.g. the copy for our own other devices, when we have none
        key = self.store.pickle_key
        with self.store.transaction():
            for d in devices:
                peer = _peer(account, d.keys.ed25519)
                rows = self.store.sessions(peer)
                if not rows:
                    raise LocalProtocolError("no session for a device; claim keys first")
                row_id, pickled = rows[0]
                session = OlmSession.from_pickle(pickled.decode(), key)
                bound = msgspec.structs.replace(
                    payload,
                    sender=self.account_id,
                    sender_device=self.device_id,
                    recipient=account,
                    recipient_device=d.keys.ed25519,
                )
                msg_type, body = session.encrypt(padding.pad(_enc.encode(bound)))
                self.store.save_session(row_id, peer, session.pickle(key).encode(), self._now_ms())
                out.append(self._sealed_for(d, msg_type, body))
        return out

    def _sealed_for(self, device: DeviceRecord, msg_type: int, body: bytes) -> OutEnvelope:
        """An envelope only ``device`` can open, naming us as its sender inside."""
        inner = Sealed(
            account=self.account_id,
            device=self.device_id,
            curve=self._account.curve25519,
            type=msg_type,
            body=body,
        )
        box = seal.seal(device.keys.seal, _enc.encode(inner), device.keys.ed25519.encode())
        return OutEnvelope(device=device.keys.ed25519, body=box)

    def sending_devices(self, account: str) -> list[str]:
        """The devices of ``account`` a message goes to (ours left out)."""
        return [
            d.keys.ed25519
            for d in self.devices_for_sending(account)
            if d.keys.ed25519 != self.device_id
        ]

    def group_envelopes(
        self, group: str, payload: GroupText | File, accounts: list[str]
    ) -> list[tuple[str, list[OutEnvelope]]]:
        """``payload`` encrypted once with our group session, sealed for every device of
        ``accounts`` (the group's members, ours left out), per account."""
        bound = msgspec.structs.replace(
            payload, sender=self.account_id, sender_device=self.device_id
        )
        out: list[tuple[str, list[OutEnvelope]]] = []
        with self.store.transaction():
            body = _enc.encode(self.groups.encrypt(group, padding.pad(_enc.encode(bound))))
            for account in accounts:
                devices = [
                    d for d in self.devices_for_sending(account) if d.keys.ed25519 != self.device_id
                ]
                out.append((account, [self._sealed_for(d, MEGOLM, body) for d in devices]))
        return out

    def check_verified(self, account: str, payload: Payload) -> None:
        """Refuse (VerificationBroken) anything but verification messages to an account
        whose SAS verification broke: its identity or a verified device changed."""
        if account != self.account_id and not isinstance(payload, VERIFY_KINDS):
            self.verification.require_intact(account)

    def new_text(self, conversation: str, text: str, reply_to: bytes = b"") -> Text:
        """A message in ``conversation`` (1:1: the peer's account ID), bound to each recipient
        device by :meth:`encrypt`; ``reply_to`` quotes a message of the same conversation
        (UnknownReply otherwise)."""
        return Text(
            id=self._random(16),
            ts=self._now_ms(),
            text=text,
            to=conversation,
            expire_s=self.features.timers.seconds(conversation),
            reply_to=self._check_reply(conversation, reply_to),
        )

    def _check_reply(self, conversation: str, reply_to: bytes) -> bytes:
        """A reply may quote only a message this device holds in the same conversation: an ID
        from another conversation would tell that conversation's peer that it exists."""
        if not reply_to:
            return b""
        if len(reply_to) != MESSAGE_ID_BYTES:
            raise UnknownReply(f"a message ID is {MESSAGE_ID_BYTES} bytes ({len(reply_to)} given)")
        if self.find_message(conversation, reply_to) is None:
            raise UnknownReply("no message with that ID in this conversation")
        return reply_to

    def find_message(self, conversation: str, id_: bytes) -> Message | None:
        """The message ``id_`` of ``conversation`` as history shows it; None if this device does
        not hold it there (never one of another conversation, nor one that expired)."""
        if not id_:
            return None
        for raw in self.store.messages(conversation):
            m = _stored_dec.decode(raw)
            if m.id == id_ and m.conversation == conversation:
                return self.features.shown(m)
        return None

    def quoted(self, message: Message) -> Message | None:
        """The message ``message`` replies to, from this device's history of the same
        conversation; None when it is not a reply or when we do not have it ("a message you
        do not have"): a reply naming a message of another conversation finds nothing here."""
        return self.find_message(message.conversation, message.reply_to)

    def find_by_prefix(self, conversation: str, prefix: str) -> Message:
        """The one message of ``conversation`` whose hex ID starts with ``prefix`` (at least 8
        hex digits, as ``history --json`` prints them); UnknownReply when none or several."""
        prefix = prefix.strip().lower()
        if len(prefix) < 8 or len(prefix) > 2 * MESSAGE_ID_BYTES:
            raise UnknownReply("give 8 to 32 hex digits of the message's ID")
        try:
            bytes.fromhex(prefix[: len(prefix) // 2 * 2])
        except ValueError as exc:
            raise UnknownReply("a message ID is hex digits") from exc
        found = [m for m in self.history(conversation) if m.id.hex().startswith(prefix)]
        if len(found) != 1:
            why = "no message" if not found else "several messages"
            raise UnknownReply(f"{why} of this conversation with an ID starting {prefix}")
        return found[0]

    def new_dummy(self, to: str) -> Dummy:
        """A message the recipient ignores: it opens a fresh session (session recovery)."""
        return Dummy(id=self._random(16), ts=self._now_ms(), to=to)

    def new_group_text(self, group: str, text: str, reply_to: bytes = b"") -> GroupText:
        return GroupText(
            id=self._random(16),
            ts=self._now_ms(),
            text=text,
            to=group,
            expire_s=self.features.timers.seconds(group),
            reply_to=self._check_reply(group, reply_to),
        )

    def record_group_line(self, group: str, line: str) -> Message:
        """A change we made to a group, in its history."""
        m = StoredMessage(group, self.account_id, self._now_ms(), text=line, local=True)
        self.store.add_message(group, _enc.encode(m))
        return Message.from_stored(m)

    def new_file(self, conversation: str, attachment: AttachmentRef, caption: str = "") -> File:
        return File(
            id=self._random(16),
            ts=self._now_ms(),
            to=conversation,
            attachment=attachment,
            caption=caption,
            expire_s=self.features.timers.seconds(conversation),
        )

    def record_sent(self, payload: Text | GroupText | File) -> Message:
        with self.store.transaction():
            m = self._file_message(payload, self.account_id, payload.ts, payload.to, local=True)
            self.store.mark_seen(b"msg:" + payload.id)
            self.features.text_sent(m)
        return Message.from_stored(m)

    def _file_message(
        self,
        payload: Text | Sync | GroupText | File,
        sender: str,
        ts: int,
        conversation: str,
        *,
        local: bool = False,
    ) -> StoredMessage:
        """Store a message of ``conversation`` in its history, with its expiry."""
        if isinstance(payload, File):
            text, attachment = payload.caption, payload.attachment
        else:
            text, attachment = payload.text, None
        expire_s = 0 if isinstance(payload, Sync) else payload.expire_s
        reply_to = payload.reply_to if isinstance(payload, Text | GroupText) else b""
        m = StoredMessage(
            conversation,
            sender=sender,
            ts=ts,
            text=text,
            attachment=attachment,
            id=payload.id,
            expires=self.features.timers.expires(ts, expire_s),
            local=local,
            reply_to=reply_to,
        )
        self.store.add_message(conversation, _enc.encode(m))
        return m

    # ---- receiving ----------------------------------------------------------------------------

    def open_envelope(self, env: InEnvelope) -> Opened | None:
        """Unseal; None for an envelope seen before (a replay or a redelivery)."""
        if self.store.seen(b"env:" + env.body):
            return None
        inner = self._seal.open(env.body, self.device_id.encode())
        try:
            sealed = _sealed_dec.decode(inner)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            raise DecryptionError("sealed envelope holds no valid message") from exc
        return Opened(env, sealed)

    def conversation_of(self, payload: Payload) -> str:
        """The conversation a (bound, checked) payload belongs to, as this device files it: a
        1:1 message written to us belongs to its sender's conversation; our own copies name it."""
        return payload.sender if payload.to == self.account_id else payload.to

    def _check_binding(self, s: Sealed, payload: Payload) -> None:
        """The payload must name the sealed claim as its sender and this device as recipient."""
        if isinstance(payload, GroupText):
            raise UntrustedDevice("group messages travel only in group sessions")
        if (payload.sender, payload.sender_device) != (s.account, s.device):
            raise UntrustedDevice("message names another sender than its envelope")
        if (payload.recipient, payload.recipient_device) != (self.account_id, self.device_id):
            raise UntrustedDevice("message was written for another device")
        if s.account == self.account_id:
            return  # our own devices write in any of our conversations
        if isinstance(payload, Sync):
            raise UntrustedDevice("only our own devices may send us copies")
        if isinstance(payload, GroupUpdate | GroupKey) and is_group_id(payload.to):
            return  # the group's own rules decide (GroupBook)
        if isinstance(payload, Receipt | Timer) and is_group_id(payload.to):
            if not self.groups.is_member(payload.to, s.account):
                raise UntrustedDevice("receipt or timer for a group from someone not in it")
            return
        if payload.to != self.account_id:
            raise UntrustedDevice("message was written in another conversation")

    def _payload(self, plaintext: bytes) -> Payload:
        try:
            return _payload_dec.decode(padding.unpad(plaintext))
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            raise DecryptionError("decrypted message is malformed") from exc
        except ValueError as exc:
            raise DecryptionError("decrypted message is badly padded") from exc

    def precheck(self, opened: Opened) -> None:
        """For a device we do not know yet: decrypt without keeping anything, and check that the
        message binds this claim to us. Only then may the client fetch the claimed account's
        devices (a forged claim costs nothing and makes no request)."""
        s = opened.sealed
        trial = OlmAccount.from_pickle(self._identity.account_pickle, self.store.pickle_key)
        if s.type != PRE_KEY:
            raise DecryptionError("message from an unknown device that is not a pre-key message")
        _, plaintext = trial.create_inbound_session(s.curve, s.type, s.body)
        self._check_binding(s, self._payload(plaintext))

    def decrypt(self, opened: Opened) -> Message | None:
        """Decrypt and store; None when the message was seen before or carries no text."""
        s = opened.sealed
        record = self._device(s.account, s.device)
        if record is None:
            raise UntrustedDevice(f"message from a device {s.account} has not certified")
        if record.keys.curve25519 != s.curve:
            raise UntrustedDevice("envelope names another key than the sender device's")
        try:
            return self._decrypt_and_store(opened, s)
        except BaseException:
            # The profile's transaction rolled back, but the Olm account in memory may have
            # used up a one-time key: go back to what the profile holds.
            self._rollback()
            raise

    def _decrypt_and_store(self, opened: Opened, s: Sealed) -> Message | None:
        if s.type == MEGOLM:
            return self._decrypt_group(opened, s)
        # In a batch (see batch()), a failure here rolls back this envelope's writes only.
        with self.store.savepoint():
            plaintext = self._olm_decrypt(_peer(s.account, s.device), s.curve, s.type, s.body)
            self.store.mark_seen(b"env:" + opened.envelope.body)
            payload = self._payload(plaintext)
            self._check_binding(s, payload)
            if self.store.seen(b"msg:" + payload.id):
                return None
            self.store.mark_seen(b"msg:" + payload.id)
            return self._apply(s, payload)

    def _decrypt_group(self, opened: Opened, s: Sealed) -> Message | None:
        with self.store.savepoint():
            self.store.mark_seen(b"env:" + opened.envelope.body)
            got = self.groups.decrypt(s.account, s.device, s.body)
            if got is None:
                return None
            group, plaintext = got
            payload = self._payload(plaintext)
            if not isinstance(payload, GroupText | File):
                raise UntrustedDevice("a group session carries group messages only")
            self.groups.check_text(group, s.account, s.device, payload)
            if self.store.seen(b"msg:" + payload.id):
                return None
            self.store.mark_seen(b"msg:" + payload.id)
            return self._apply(s, payload)

    def _peer_time(self, payload: Payload) -> int:
        """A peer's timestamp as we keep it: at most MAX_CLOCK_SKEW_MS ahead of our clock."""
        return clamp_ts(min(payload.ts, self._now_ms() + MAX_CLOCK_SKEW_MS))

    def _apply(self, s: Sealed, payload: Payload) -> Message | None:
        """What a checked, first-seen payload changes, inside its envelope's transaction: one
        case per kind. A message for the user comes back; anything else may add to
        :attr:`notices`."""
        match payload:
            case Text() | Sync() | File() | GroupText():
                ts = self._peer_time(payload)
                m = self._file_message(payload, s.account, ts, self.conversation_of(payload))
                if isinstance(payload, File):
                    received = ReceivedFile(payload.attachment, m.conversation, s.account)
                    self.store.put(self._file_name(payload.attachment.id), _enc.encode(received))
                self.features.text_stored(m)
                return Message.from_stored(m)
            case GroupUpdate():
                line = self.groups.apply_update(s.account, s.device, payload)
                if line is None:
                    return None
                ts = self._peer_time(payload)
                m = StoredMessage(payload.to, sender=s.account, ts=ts, text=line)
                self.store.add_message(payload.to, _enc.encode(m))
                return Message.from_stored(m)
            case GroupKey():
                self.groups.add_key(s.account, s.device, payload)
                return None
            case Dummy():
                return None
            case ContactSync():
                self.features.contacts.apply(s, payload)  # own devices only
                return None
            case NoteSync():
                self.features.notes.apply(s, payload)  # own devices only
                return None
            case Timer():
                ts = self._peer_time(payload)
                return self.features.timers.apply(s, payload, ts)
            case Receipt():
                self.features.receipts.apply(s, payload)
                return None
            case (
                VerifyRequest()
                | VerifyAccept()
                | VerifyKey()
                | VerifyMac()
                | VerifyDone()
                | VerifyCancel()
            ):
                self.verification.receive(s.account, s.device, payload)
                return None

    @contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction (one durable commit) for several received envelopes: each
        :meth:`decrypt` in it keeps its writes or rolls them back alone, :meth:`quarantine` and
        :meth:`mark_session_broken` join it. Nothing of it is kept unless it all commits, so
        acknowledge the envelopes only after the block ends; on failure the in-memory Olm
        account goes back to what the profile holds, too."""
        try:
            with self.store.transaction():
                yield
        except BaseException:
            self._rollback()
            raise

    def _olm_decrypt(self, peer: str, curve: str, msg_type: int, body: bytes) -> bytes:
        key = self.store.pickle_key
        for row_id, pickled in self.store.sessions(peer):
            session = OlmSession.from_pickle(pickled.decode(), key)
            if msg_type == PRE_KEY and not session.matches(msg_type, body):
                continue
            try:
                plaintext = session.decrypt(msg_type, body)
            except DecryptionError:
                if msg_type == PRE_KEY:
                    raise  # the matching session refuses it: a replay or corruption
                continue
            self.store.save_session(row_id, peer, session.pickle(key).encode(), self._now_ms())
            return plaintext
        if msg_type != PRE_KEY:
            raise DecryptionError("no session decrypts this message (session lost or broken)")
        session, plaintext = self._account.create_inbound_session(curve, msg_type, body)
        self.store.save_session(None, peer, session.pickle(key).encode(), self._now_ms())
        self._save_identity()  # the one-time key is used up
        return plaintext

    def _rollback(self) -> None:
        """After a failed decryption: forget in-memory Olm state the profile did not keep."""
        raw = self.store.get("identity")
        if raw is not None:
            self._identity = _identity_dec.decode(raw)
            self._account = OlmAccount.from_pickle(
                self._identity.account_pickle, self.store.pickle_key
            )

    def quarantine(self, env: InEnvelope, error: BaseException) -> None:
        """Keep an unreadable envelope (still sealed) and never process it again by itself."""
        code = error.code if isinstance(error, KluisError) else "internal"
        name = "quarantine:" + hashlib.sha256(env.body).hexdigest()
        # A flood of junk must not grow the profile without bound: past the cap, only counted.
        body = env.body if self.quarantined() < QUARANTINE_KEEP else b""
        with self.store.transaction():
            self.store.mark_seen(b"env:" + env.body)
            record = Quarantined(body=body, code=code, received=self._now_ms() // 3_600_000)
            self.store.put(name, _enc.encode(record))

    def quarantined(self) -> int:
        """How many envelopes could not be read (kept in the profile, encrypted)."""
        return len(self.store.names("quarantine:"))

    def mark_session_broken(self, account: str, device: str) -> bool:
        """After an undecryptable message from a device we trust: the next send to it opens a
        fresh session, and a recovery may follow later (see :meth:`due_recoveries`)."""
        if self._device(account, device) is None:
            return False
        broken = self._broken()
        peer = _peer(account, device)
        since, last = broken.get(peer, (0, 0))
        broken[peer] = (since or self._now_ms(), last)
        self._save_broken(broken)
        return True

    def due_recoveries(self, limit: int = 5) -> list[str]:
        """Accounts owed a recovery message now: broken for a while, not recovered this hour.

        Marks them as tried, so a failure (or a lie) does not make us try again soon.
        """
        now = self._now_ms()
        broken = self._broken()
        due: list[str] = []
        for peer, (since, last) in sorted(broken.items()):
            if since and now - since > RECOVERY_FORGET_MS:
                continue
            waited = since and now - since >= RECOVERY_DELAY_MS
            if len(due) < limit and waited and now - last >= RECOVERY_INTERVAL_MS:
                account = peer.partition("/")[0]
                if account not in due:
                    due.append(account)
                broken[peer] = (since, now)
        kept = {
            p: (since, last)
            for p, (since, last) in broken.items()
            if (since and now - since <= RECOVERY_FORGET_MS) or now - last < RECOVERY_INTERVAL_MS
        }
        if due or kept != broken:
            self._save_broken(kept)
        return due

    # ---- attachments --------------------------------------------------------------------------

    def _file_name(self, blob: str) -> str:
        return "file:" + self.store.blind(blob).hex()

    def unsaved_files(self) -> list[ReceivedFile]:
        """Attachments received and not saved yet, in no particular order."""
        out = []
        for name in self.store.names("file:"):
            raw = self.store.get(name)
            if raw is not None and not (f := _file_dec.decode(raw)).saved:
                out.append(f)
        return out

    def file_saved(self, received: ReceivedFile) -> None:
        received.saved = True
        self.store.put(self._file_name(received.attachment.id), _enc.encode(received))

    # ---- history ------------------------------------------------------------------------------

    def unshown(self) -> list[tuple[int, Message]]:
        """(seq, message) of what reached this device and ``inbox`` has not printed yet, in
        the order it arrived. A message stays here until :meth:`shown` moves past it, so one
        acknowledged to the server and stored is never lost to an interrupted ``inbox``."""
        raw = self.store.get("inbox-cursor")
        cursor = msgspec.msgpack.decode(raw, type=int) if raw else 0
        out = []
        # Only the rows past the cursor: an inbox that waits asks after every batch, and a long
        # history must not be read and decrypted again each time.
        for seq, value in self.store.message_rows(after=cursor):
            m = _stored_dec.decode(value)
            shown = None if m.local else self.features.shown(m)
            if shown is not None:
                out.append((seq, shown))
        return out

    def shown(self, seq: int) -> None:
        """``inbox`` printed everything up to ``seq``."""
        raw = self.store.get("inbox-cursor")
        if not raw or msgspec.msgpack.decode(raw, type=int) < seq:
            self.store.put("inbox-cursor", _enc.encode(seq))

    def history(self, conversation: str | None = None) -> list[Message]:
        """Stored messages of ``conversation`` (all when None), oldest first by the sender's
        clock (arrival order breaks ties)."""
        stored = [_stored_dec.decode(v) for v in self.store.messages(conversation)]
        shown = (self.features.shown(m) for m in sorted(stored, key=lambda m: m.ts))
        return [m for m in shown if m is not None]  # not what expired, even before a sweep
