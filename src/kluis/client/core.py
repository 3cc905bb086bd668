"""The client's sans-IO core: identity, key pinning, Olm sessions, sealing and history.

Theory of operation: :class:`ClientCore` never touches the network. The async client asks it for
what to send (signed device keys, one-time keys to upload, envelopes for a message) and feeds it
what arrived (device lists, key bundles, envelopes). Each state change is written to the
encrypted profile in one transaction *before* the result is handed back, so nothing goes on the
wire that the profile could forget.

Receiving an envelope takes two steps so that the transport can fetch a device list between
them: :meth:`open_envelope` (replay check and unsealing: who claims to have sent it) and
:meth:`decrypt` (Olm, deduplication, history). A sender's claim is believed only because the Olm
session that decrypts it is bound to that device's pinned Curve25519 key.

Pinning: the first device list seen for an account is trusted (TOFU). Later, a device already
pinned must keep its keys, and a new device must carry a valid approval from a pinned device;
anything else raises :class:`KeyChanged` and sending to that account stops until
:meth:`acknowledge_key_change`.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from kluis.client.store import ProfileStore
from kluis.crypto import padding, seal
from kluis.crypto.olm import PRE_KEY, OlmAccount, OlmSession, verify_signature
from kluis.errors import (
    BadSignature,
    DecryptionError,
    KeyChanged,
    LocalProtocolError,
    UntrustedDevice,
)
from kluis.protocol import signing
from kluis.protocol.frames import (
    Bundle,
    DeviceKeys,
    DeviceRecord,
    InEnvelope,
    OutEnvelope,
    SignedKey,
)

ONE_TIME_KEY_TARGET = 50


# ---- records kept in the profile and inside ciphertexts ------------------------------------------


class Identity(msgspec.Struct):
    account_pickle: str
    seal_private: bytes
    server: str
    account_id: str = ""
    link_token: str = ""  # set while this device waits for approval


class Pins(msgspec.Struct):
    account: str
    known: dict[str, DeviceRecord]  # every device ever trusted, by ed25519
    active: list[str]
    pending: list[DeviceRecord] | None = None  # a changed list, waiting for acknowledgement


class Payload(msgspec.Struct, frozen=True):
    """Inside Olm: what the sender wrote."""

    id: bytes
    ts: int  # sender's clock, milliseconds since the epoch
    kind: str  # "text", "sync" (copy of our own message for our other devices), "dummy"
    text: str = ""
    to: str = ""  # for "sync": the conversation's peer


class Sealed(msgspec.Struct, frozen=True):
    """Inside the sealed box: who claims to send, and the Olm message."""

    account: str
    device: str
    type: int
    body: bytes


class StoredMessage(msgspec.Struct, frozen=True):
    peer: str
    sender: str
    ts: int
    text: str


@dataclass(frozen=True, slots=True)
class Message:
    """A message as the user sees it."""

    sender: str
    peer: str
    time: datetime
    text: str

    @classmethod
    def from_stored(cls, m: StoredMessage) -> Message:
        return cls(m.sender, m.peer, datetime.fromtimestamp(m.ts / 1000, UTC), m.text)

    def line(self) -> str:
        text = self.text.replace("\n", " ").replace("\t", " ")
        return f"{self.sender}\t{self.time.isoformat(timespec='milliseconds')}\t{text}"


@dataclass(frozen=True, slots=True)
class Opened:
    envelope: InEnvelope
    sealed: Sealed


_enc = msgspec.msgpack.Encoder()
_identity_dec = msgspec.msgpack.Decoder(Identity)
_pins_dec = msgspec.msgpack.Decoder(Pins)
_payload_dec = msgspec.msgpack.Decoder(Payload)
_sealed_dec = msgspec.msgpack.Decoder(Sealed)
_stored_dec = msgspec.msgpack.Decoder(StoredMessage)


def safety_number(account: str, devices: list[DeviceRecord]) -> str:
    """30 digits naming an account's device keys, for comparing out of band.

    Two people who see the same number for an account see the same keys: a server that swapped
    keys on first contact is caught. The number changes when the account adds or drops a device.
    """
    keys = sorted(
        signing.device_keys_message(d.keys.ed25519, d.keys.curve25519, d.keys.seal) for d in devices
    )
    digest = hashlib.sha256(b"\x00".join([b"kluis-safety-number-v1", account.encode(), *keys]))
    raw = digest.digest()
    groups = [int.from_bytes(raw[i : i + 5], "big") % 100_000 for i in range(0, 30, 5)]
    return " ".join(f"{g:05d}" for g in groups)


def check_record(account: str, record: DeviceRecord) -> None:
    """A device's self-signature, and its approval when it has an approver."""
    k = record.keys
    verify_signature(k.ed25519, signing.device_keys_message(k.ed25519, k.curve25519, k.seal), k.sig)
    if record.approver:
        verify_signature(record.approver, signing.approval_message(account, k), record.approval)


def link_fingerprint(keys: DeviceKeys) -> str:
    """Short check code the approving device compares, so a server cannot swap the keys."""
    digest = hashlib.sha256(signing.device_keys_message(keys.ed25519, keys.curve25519, keys.seal))
    return digest.hexdigest()[:8]


class ClientCore:
    def __init__(self, store: ProfileStore, identity: Identity) -> None:
        self.store = store
        self._identity = identity
        self._account = OlmAccount.from_pickle(identity.account_pickle, store.pickle_key)
        self._seal = seal.SealKeyPair.from_private_bytes(identity.seal_private)
        self._clock = time.time

    # ---- identity -----------------------------------------------------------------------------

    @classmethod
    def create(cls, store: ProfileStore, server: str) -> ClientCore:
        account = OlmAccount()
        identity = Identity(
            account_pickle=account.pickle(store.pickle_key),
            seal_private=seal.SealKeyPair().private_bytes(),
            server=server,
        )
        store.put("identity", _enc.encode(identity))
        return cls(store, identity)

    @classmethod
    def load(cls, store: ProfileStore) -> ClientCore:
        raw = store.get("identity")
        if raw is None:
            raise LocalProtocolError("profile has no identity")
        return cls(store, _identity_dec.decode(raw))

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

    def set_account(self, account_id: str) -> None:
        if self._identity.account_id and self._identity.account_id != account_id:
            raise LocalProtocolError("server reports a different account for this device")
        self._identity.account_id, self._identity.link_token = account_id, ""
        self._save_identity()

    def set_link_token(self, token: str) -> None:
        self._identity.link_token = token
        self._save_identity()

    def device_keys(self) -> DeviceKeys:
        ed, curve, sealing = self._account.ed25519, self._account.curve25519, self._seal.public
        sig = self._account.sign(signing.device_keys_message(ed, curve, sealing))
        return DeviceKeys(ed25519=ed, curve25519=curve, seal=sealing, sig=sig)

    def sign_challenge(self, nonce: bytes) -> str:
        return self._account.sign(signing.challenge_message(nonce, self.device_id))

    def approve(self, keys: DeviceKeys, fingerprint: str) -> DeviceRecord:
        """Sign the approval that admits ``keys`` as a new device of our account."""
        if link_fingerprint(keys) != fingerprint.lower():
            raise BadSignature("link code does not match the requesting device's keys")
        check_record(self.account_id, DeviceRecord(keys=keys))
        approval = self._account.sign(signing.approval_message(self.account_id, keys))
        return DeviceRecord(keys=keys, approver=self.device_id, approval=approval)

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

    # ---- device directory and pinning ---------------------------------------------------------

    def _pins_name(self, account: str) -> str:
        return "pins:" + self.store.blind(account).hex()

    def _pins(self, account: str) -> Pins | None:
        raw = self.store.get(self._pins_name(account))
        return _pins_dec.decode(raw) if raw else None

    def _save_pins(self, pins: Pins) -> None:
        self.store.put(self._pins_name(pins.account), _enc.encode(pins))

    def trusted_devices(self, account: str) -> list[DeviceRecord] | None:
        """The active pinned devices, or None if never fetched or a key change is pending."""
        pins = self._pins(account)
        if pins is None or pins.pending is not None:
            return None
        return [pins.known[d] for d in pins.active]

    def safety_number(self, account: str) -> str:
        """Of the keys we would use: the pending (changed) list while a change awaits
        acknowledgement, so the user can compare it before trusting it."""
        pins = self._pins(account)
        if pins is None:
            raise LocalProtocolError(f"no device list for {account} yet")
        if pins.pending is not None:
            return safety_number(account, pins.pending)
        return safety_number(account, [pins.known[d] for d in pins.active])

    def pending_key_change(self, account: str) -> bool:
        pins = self._pins(account)
        return pins is not None and pins.pending is not None

    def accept_devices(self, account: str, records: list[DeviceRecord]) -> None:
        """Take a device list from the server, pinning on first use; raise on a change."""
        for r in records:
            check_record(account, r)
        pins = self._pins(account)
        if pins is None:
            known = {r.keys.ed25519: r for r in records}
            if account == self.account_id and self.device_id not in known:
                raise UntrustedDevice("our own device is missing from our account's device list")
            self._save_pins(Pins(account=account, known=known, active=list(known)))
            return
        if pins.pending is not None:
            raise KeyChanged(
                f"keys of {account} changed; acknowledge before sending", account=account
            )
        changed = False
        for r in records:
            old = pins.known.get(r.keys.ed25519)
            if old is not None:
                if old.keys != r.keys:
                    changed = True
            elif r.approver not in pins.known:
                changed = True  # a device no trusted device vouched for
            else:
                pins.known[r.keys.ed25519] = r
        if changed:
            pins.pending = records
            self._save_pins(pins)
            raise KeyChanged(
                f"keys of {account} changed; acknowledge before sending", account=account
            )
        pins.active = [r.keys.ed25519 for r in records]
        self._save_pins(pins)

    def acknowledge_key_change(self, account: str) -> None:
        """The user accepts the new keys of ``account``: pin them and resume sending."""
        pins = self._pins(account)
        if pins is None or pins.pending is None:
            return
        with self.store.transaction():
            for r in pins.pending:
                old = pins.known.get(r.keys.ed25519)
                if old is not None and old.keys != r.keys:
                    self.store.drop_sessions(old.keys.curve25519)
                pins.known[r.keys.ed25519] = r
            pins.active = [r.keys.ed25519 for r in pins.pending]
            pins.pending = None
            self._save_pins(pins)

    def _device(self, account: str, device: str) -> DeviceRecord | None:
        pins = self._pins(account)
        if pins is None or pins.pending is not None:
            return None
        return pins.known.get(device)

    def knows_device(self, account: str, device: str) -> bool:
        return self._device(account, device) is not None

    # ---- Olm sessions -------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def devices_without_session(self, account: str) -> list[str]:
        devices = self.trusted_devices(account)
        if devices is None:
            raise KeyChanged(f"no trusted device list for {account}", account=account)
        broken = self._broken()
        return [
            d.keys.ed25519
            for d in devices
            if d.keys.ed25519 != self.device_id
            and (d.keys.curve25519 in broken or not self.store.sessions(d.keys.curve25519))
        ]

    def _broken(self) -> set[str]:
        raw = self.store.get("broken")
        return set(msgspec.msgpack.decode(raw, type=list[str])) if raw else set()

    def _set_broken(self, curve: str, broken: bool) -> None:
        current = self._broken()
        updated = current | {curve} if broken else current - {curve}
        if updated != current:
            self.store.put("broken", _enc.encode(sorted(updated)))

    def add_bundles(self, account: str, bundles: list[Bundle]) -> None:
        """Open outbound sessions from claimed keys, after checking every signature."""
        with self.store.transaction():
            for b in bundles:
                record = self._device(account, b.device.keys.ed25519)
                if record is None or record.keys != b.device.keys:
                    raise UntrustedDevice("claimed keys belong to a device we do not trust")
                k = b.one_time_key
                msg = signing.one_time_key_message(record.keys.ed25519, k.key_id, k.key)
                verify_signature(record.keys.ed25519, msg, k.sig)
                session = self._account.create_outbound_session(record.keys.curve25519, k.key)
                pickled = session.pickle(self.store.pickle_key).encode()
                self.store.save_session(None, record.keys.curve25519, pickled, self._now_ms())
                self._set_broken(record.keys.curve25519, False)

    def encrypt(self, account: str, payload: Payload) -> list[OutEnvelope]:
        """One sealed envelope per trusted device of ``account`` (ours excluded)."""
        devices = self.trusted_devices(account)
        if devices is None:
            raise KeyChanged(f"no trusted device list for {account}", account=account)
        plaintext = padding.pad(_enc.encode(payload))
        out: list[OutEnvelope] = []
        with self.store.transaction():
            for d in devices:
                if d.keys.ed25519 == self.device_id:
                    continue
                rows = self.store.sessions(d.keys.curve25519)
                if not rows:
                    raise LocalProtocolError("no session for a device; claim keys first")
                row_id, pickled = rows[0]
                session = OlmSession.from_pickle(pickled.decode(), self.store.pickle_key)
                msg_type, body = session.encrypt(plaintext)
                self.store.save_session(
                    row_id,
                    d.keys.curve25519,
                    session.pickle(self.store.pickle_key).encode(),
                    self._now_ms(),
                )
                inner = Sealed(
                    account=self.account_id, device=self.device_id, type=msg_type, body=body
                )
                box = seal.seal(d.keys.seal, _enc.encode(inner), d.keys.ed25519.encode())
                out.append(OutEnvelope(device=d.keys.ed25519, body=box))
        return out

    def new_payload(self, kind: str, text: str = "", to: str = "") -> Payload:
        return Payload(id=os.urandom(16), ts=self._now_ms(), kind=kind, text=text, to=to)

    def record_sent(self, peer: str, payload: Payload) -> Message:
        m = StoredMessage(peer=peer, sender=self.account_id, ts=payload.ts, text=payload.text)
        with self.store.transaction():
            self.store.add_message(peer, _enc.encode(m))
            self.store.mark_seen(b"msg:" + payload.id)
        return Message.from_stored(m)

    # ---- receiving ----------------------------------------------------------------------------

    def open_envelope(self, env: InEnvelope) -> Opened | None:
        """Unseal; None for an envelope seen before (a replay or a redelivery)."""
        if self.store.seen(b"env:" + env.body):
            return None
        inner = self._seal.open(env.body, self.device_id.encode())
        try:
            sealed = _sealed_dec.decode(inner)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # not UTF-8: UnicodeDecodeError
            raise DecryptionError("sealed envelope holds no valid message") from exc
        return Opened(env, sealed)

    def decrypt(self, opened: Opened) -> Message | None:
        """Decrypt and store; None when the message was seen before or carries no text."""
        s = opened.sealed
        record = self._device(s.account, s.device)
        if record is None:
            raise UntrustedDevice(f"message from an unknown device of {s.account}")
        curve = record.keys.curve25519
        with self.store.transaction():
            plaintext = self._olm_decrypt(curve, s.type, s.body)
            self.store.mark_seen(b"env:" + opened.envelope.body)
            try:
                payload = _payload_dec.decode(padding.unpad(plaintext))
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                raise DecryptionError("decrypted message is malformed") from exc
            if self.store.seen(b"msg:" + payload.id) or payload.kind not in ("text", "sync"):
                return None
            self.store.mark_seen(b"msg:" + payload.id)
            if payload.kind == "sync":
                if s.account != self.account_id:
                    raise UntrustedDevice("only our own devices may send us copies")
                peer = payload.to
            else:
                peer = s.account
            m = StoredMessage(peer=peer, sender=s.account, ts=payload.ts, text=payload.text)
            self.store.add_message(peer, _enc.encode(m))
        return Message.from_stored(m)

    def _olm_decrypt(self, curve: str, msg_type: int, body: bytes) -> bytes:
        key = self.store.pickle_key
        rows = self.store.sessions(curve)
        for row_id, pickled in rows:
            session = OlmSession.from_pickle(pickled.decode(), key)
            if msg_type == PRE_KEY and not session.matches(msg_type, body):
                continue
            try:
                plaintext = session.decrypt(msg_type, body)
            except DecryptionError:
                if msg_type == PRE_KEY:
                    raise  # the matching session refuses it: a replay or corruption
                continue
            self.store.save_session(row_id, curve, session.pickle(key).encode(), self._now_ms())
            return plaintext
        if msg_type != PRE_KEY:
            raise DecryptionError("no session decrypts this message (session lost or broken)")
        session, plaintext = self._account.create_inbound_session(curve, msg_type, body)
        self.store.save_session(None, curve, session.pickle(key).encode(), self._now_ms())
        self._save_identity()  # the one-time key is used up
        return plaintext

    def mark_session_broken(self, account: str, device: str) -> bool:
        """After an undecryptable message: the next send to that device opens a fresh session.

        Old sessions stay, so messages already in flight on them still decrypt. Returns True
        when the device is known, i.e. when a recovery (a dummy message) is worth sending.
        """
        record = self._device(account, device)
        if record is None:
            return False
        self._set_broken(record.keys.curve25519, True)
        return True

    def broken_accounts(self) -> list[str]:
        """Accounts with a device whose session needs replacing."""
        broken = self._broken()
        if not broken:
            return []
        out = []
        for name in self.store.names("pins:"):
            raw = self.store.get(name)
            if raw is None:
                continue
            pins = _pins_dec.decode(raw)
            if any(pins.known[d].keys.curve25519 in broken for d in pins.active):
                out.append(pins.account)
        return out

    # ---- history ------------------------------------------------------------------------------

    def history(self, peer: str | None = None) -> list[Message]:
        """Stored messages, oldest first by the sender's clock (arrival order breaks ties)."""
        stored = [_stored_dec.decode(v) for v in self.store.messages(peer)]
        return [Message.from_stored(m) for m in sorted(stored, key=lambda m: m.ts)]
