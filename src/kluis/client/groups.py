"""Groups: membership kept by every member device, messages encrypted once with Megolm.

Theory of operation (sans-IO, over the profile store; :class:`kluis.client.core.ClientCore`
owns a :class:`GroupBook` and calls it from inside each envelope's transaction):

- A group is a random ID, a name and a member list (account IDs). The server never sees any of
  it: changes travel as :class:`GroupUpdate` payloads over Olm to every member device, signed by
  the device that made them, and each device keeps the state with the highest (version, update
  id), so concurrent changes converge. Only a current member may change a group; a device that
  does not know a group accepts it only from a member that lists us.
- Each member device sends with its own Megolm outbound session. Before a message, every member
  device that does not hold the session's key gets it in a :class:`GroupKey` over Olm; the
  message (:class:`GroupText`) is then encrypted once and sealed per recipient device.
- Rotation: when a member is removed or leaves, or a device it was shared with disappears, and
  after ``ROTATE_MESSAGES`` messages or ``ROTATE_MS``, the next message starts a new session,
  shared only with the devices of the current members: a removed member holds no key for it.
- A received group message must come through a session whose key the sending device itself
  gave us over Olm, for that group, and its sender must still be a member; each (device,
  session, index) is accepted once.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Literal

import msgspec

from kluis.client.store.protocol import ClientStore
from kluis.crypto.megolm import InboundGroupSession, OutboundGroupSession
from kluis.crypto.olm import verify_signature
from kluis.errors import BadSignature, DecryptionError, LocalProtocolError, UntrustedDevice
from kluis.protocol import signing
from kluis.protocol.payload import MAX_GROUP_MEMBERS, File, GroupKey, GroupText, GroupUpdate

ROTATE_MESSAGES = 100
ROTATE_MS = 7 * 24 * 3600 * 1000
GROUP_PREFIX = "g"  # group IDs: "g" + 24 base32 characters (account IDs have 16)

Action = Literal["create", "rename", "add", "remove", "leave"]


class GroupState(msgspec.Struct):
    id: str
    name: str
    members: list[str]  # account IDs, sorted
    version: int
    update: bytes  # the ID of the update that made this version (breaks ties)
    member: bool = True  # False once we left or were removed


class Outbound(msgspec.Struct):
    pickle: str
    created: int  # milliseconds
    sent: int  # messages sent with it
    shared: list[str]  # "account/device" that hold its key


class Inbound(msgspec.Struct):
    group: str
    account: str
    device: str
    pickle: str


class MegolmBody(msgspec.Struct, frozen=True):
    """What a sealed envelope of type MEGOLM carries: the group message and its session."""

    session: str
    message: bytes


_enc = msgspec.msgpack.Encoder()
_state_dec = msgspec.msgpack.Decoder(GroupState)
_out_dec = msgspec.msgpack.Decoder(Outbound)
_in_dec = msgspec.msgpack.Decoder(Inbound)
_body_dec = msgspec.msgpack.Decoder(MegolmBody)


def is_group_id(conversation: str) -> bool:
    return len(conversation) == 25 and conversation.startswith(GROUP_PREFIX)


def _peer(account: str, device: str) -> str:
    return f"{account}/{device}"


class GroupBook:
    """The groups this device knows, and its group sessions."""

    def __init__(
        self,
        store: ClientStore,
        *,
        account: Callable[[], str],
        device: str,
        sign: Callable[[bytes], str],
        now_ms: Callable[[], int],
        random: Callable[[int], bytes],
    ) -> None:
        self.store = store
        self._account = account
        self._device = device
        self._sign = sign
        self._now_ms = now_ms
        self._random = random

    # ---- state ----------------------------------------------------------------------------------

    def _name(self, kind: str, key: str) -> str:
        return f"{kind}:" + self.store.blind(key).hex()

    def get(self, group: str) -> GroupState | None:
        raw = self.store.get(self._name("group", group))
        return None if raw is None else _state_dec.decode(raw)

    def all(self) -> list[GroupState]:
        out = []
        for name in self.store.names("group:"):
            raw = self.store.get(name)
            if raw is not None:
                out.append(_state_dec.decode(raw))
        return sorted(out, key=lambda g: (g.name, g.id))

    def _save(self, state: GroupState) -> None:
        self.store.put(self._name("group", state.id), _enc.encode(state))

    def is_member(self, group: str, account: str) -> bool:
        """``account`` is in ``group``, and so are we."""
        state = self.get(group)
        return state is not None and state.member and account in state.members

    def current(self, group: str) -> GroupState:
        """A group we are a member of, or LocalProtocolError."""
        state = self.get(group)
        if state is None:
            raise LocalProtocolError(f"no group {group} on this device")
        if not state.member:
            raise LocalProtocolError(f"you are no longer a member of group {group}")
        return state

    # ---- changes we make --------------------------------------------------------------------------

    def _signed(self, state: GroupState, action: Action, update_id: bytes) -> GroupUpdate:
        me = self._account()
        message = signing.group_update_message(
            state.id, update_id, action, state.name, state.members, state.version, me, self._device
        )
        return GroupUpdate(
            id=update_id,
            ts=self._now_ms(),
            to=state.id,
            action=action,
            name=state.name,
            members=state.members,
            version=state.version,
            sig=self._sign(message),
        )

    def create(self, name: str, members: list[str]) -> tuple[GroupState, GroupUpdate]:
        group = GROUP_PREFIX + base64.b32encode(self._random(15)).decode().lower()
        update_id = self._random(16)
        everyone = sorted({self._account(), *members})
        _check_members(everyone)
        state = GroupState(group, _check_name(name), everyone, 1, update_id)
        update = self._signed(state, "create", update_id)
        self._save(state)
        return state, update

    def change(
        self, group: str, action: Action, accounts: list[str] | None = None, name: str | None = None
    ) -> tuple[GroupState, GroupUpdate, list[str]]:
        """Apply our own change; returns the new state, the update, and every account that must
        hear of it (the members before and after the change)."""
        old = self.current(group)
        members = set(old.members)
        me = self._account()
        accounts = accounts or []
        if action == "add":
            members |= set(accounts)
        elif action == "remove":
            if me in accounts:
                raise LocalProtocolError("to remove yourself, leave the group")
            members -= set(accounts)
        elif action == "leave":
            members.discard(me)
        elif action == "rename":
            if name is None:
                raise LocalProtocolError("a rename needs a name")
        else:
            raise LocalProtocolError(f"unknown group change {action!r}")
        new_members = sorted(members)
        _check_members(new_members, allow_empty=action == "leave")
        update_id = self._random(16)
        state = GroupState(
            group,
            _check_name(name) if name is not None else old.name,
            new_members,
            old.version + 1,
            update_id,
            member=action != "leave",
        )
        update = self._signed(state, action, update_id)
        self._save(state)
        if len(new_members) < len(old.members) or action == "leave":
            self._drop_outbound(group)
        return state, update, sorted(set(old.members) | set(new_members))

    # ---- changes we receive -----------------------------------------------------------------------

    def apply_update(self, account: str, device: str, update: GroupUpdate) -> str | None:
        """A change from ``account``/``device`` (Olm-authenticated): the line to show, or None
        when it is older than what we have."""
        message = signing.group_update_message(
            update.to,
            update.id,
            update.action,
            update.name,
            update.members,
            update.version,
            account,
            device,
        )
        try:
            verify_signature(device, message, update.sig)
        except BadSignature as exc:
            raise UntrustedDevice("group change is not signed by the device that sent it") from exc
        if not is_group_id(update.to):
            raise UntrustedDevice("group change names no group")
        _check_members(update.members, allow_empty=update.action == "leave")
        me = self._account()
        old = self.get(update.to)
        if old is None:
            if update.action not in ("create", "add"):
                return None  # news about a group we never joined
            if me not in update.members or account not in update.members:
                raise UntrustedDevice("group invitation from outside the group")
        else:
            if account not in old.members:
                raise UntrustedDevice("group change by someone who is not a member")
            _check_transition(old.members, update, account)
            if (update.version, update.id) <= (old.version, old.update):
                return None  # superseded: every member keeps the highest version
        state = GroupState(
            update.to,
            update.name,
            sorted(update.members),
            update.version,
            update.id,
            member=me in update.members,
        )
        self._save(state)
        if old is not None and set(old.members) - set(state.members):
            self._drop_outbound(update.to)  # whoever left must not read what follows
        return describe(update)

    def add_key(self, account: str, device: str, key: GroupKey) -> None:
        """A member device's session key for a group we are in (over Olm from that device)."""
        state = self.get(key.to)
        if state is None or not state.member or account not in state.members:
            raise UntrustedDevice("group key from outside the group, or for an unknown group")
        session = InboundGroupSession.from_session_key(key.session_key)
        if session.session_id != key.session_id:
            raise DecryptionError("group key does not match its session ID")
        name = self._name("megolm-in", f"{device}/{key.session_id}")
        if self.store.get(name) is not None:
            return  # the same session again (a resend): keep the key from its earliest index
        record = Inbound(key.to, account, device, session.pickle(self.store.pickle_key))
        self.store.put(name, _enc.encode(record))

    # ---- sending ---------------------------------------------------------------------------------

    def _outbound(self, group: str) -> Outbound | None:
        raw = self.store.get(self._name("megolm-out", group))
        return None if raw is None else _out_dec.decode(raw)

    def _drop_outbound(self, group: str) -> None:
        # A record cannot be deleted: an empty pickle marks "start a new session next time".
        name = self._name("megolm-out", group)
        if self.store.get(name) is not None:
            self.store.put(name, _enc.encode(Outbound("", 0, 0, [])))

    def key_shares(self, group: str, devices: dict[str, list[str]]) -> tuple[GroupKey, list[str]]:
        """Our session key for ``group`` and the accounts with a device that lacks it, given the
        current members' devices (``devices``: account -> device IDs, our own device left out).
        Starts a new session when the old one is due or reached a device no longer listed."""
        now = self._now_ms()
        current = {_peer(a, d) for a, ds in devices.items() for d in ds}
        out = self._outbound(group)
        if (
            out is None
            or not out.pickle
            or out.sent >= ROTATE_MESSAGES
            or now - out.created >= ROTATE_MS
            or not set(out.shared) <= current
        ):
            session = OutboundGroupSession()
            out = Outbound(session.pickle(self.store.pickle_key), now, 0, [])
            self.store.put(self._name("megolm-out", group), _enc.encode(out))
        else:
            session = OutboundGroupSession.from_pickle(out.pickle, self.store.pickle_key)
        shared = set(out.shared)
        lacking = sorted({a for a, ds in devices.items() for d in ds if _peer(a, d) not in shared})
        key = GroupKey(
            id=self._random(16),
            ts=now,
            to=group,
            session_id=session.session_id,
            session_key=session.session_key,
        )
        return key, lacking

    def shared(self, group: str, devices: dict[str, list[str]]) -> None:
        """Every device in ``devices`` now holds our current session key."""
        out = self._outbound(group)
        if out is None or not out.pickle:
            raise LocalProtocolError("no group session to mark as shared")
        out.shared = sorted(
            set(out.shared) | {_peer(a, d) for a, ds in devices.items() for d in ds}
        )
        self.store.put(self._name("megolm-out", group), _enc.encode(out))

    def encrypt(self, group: str, plaintext: bytes) -> MegolmBody:
        """Encrypt once with our session for ``group`` (its index advances, saved first)."""
        out = self._outbound(group)
        if out is None or not out.pickle:
            raise LocalProtocolError("no group session: share its key first")
        session = OutboundGroupSession.from_pickle(out.pickle, self.store.pickle_key)
        message = session.encrypt(plaintext)
        out.pickle, out.sent = session.pickle(self.store.pickle_key), out.sent + 1
        self.store.put(self._name("megolm-out", group), _enc.encode(out))
        return MegolmBody(session.session_id, message)

    # ---- receiving -------------------------------------------------------------------------------

    def decrypt(self, account: str, device: str, body: bytes) -> tuple[str, bytes] | None:
        """(group, plaintext) of a group message sealed by ``account``/``device``; None for one
        seen before (same session and index)."""
        try:
            parsed = _body_dec.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            raise DecryptionError("group envelope holds no valid group message") from exc
        raw = self.store.get(self._name("megolm-in", f"{device}/{parsed.session}"))
        if raw is None:
            raise DecryptionError("no key for this group session (not shared with this device)")
        inbound = _in_dec.decode(raw)
        if (inbound.account, inbound.device) != (account, device):
            raise UntrustedDevice("group session belongs to another device")
        state = self.get(inbound.group)
        if state is None or not state.member or account not in state.members:
            raise UntrustedDevice("group message from someone who is not a member")
        session = InboundGroupSession.from_pickle(inbound.pickle, self.store.pickle_key)
        index, plaintext = session.decrypt(parsed.message)
        token = f"megolm:{device}/{parsed.session}/{index}".encode()
        if self.store.seen(token):
            return None  # Megolm decrypts a replay again: the index is ours to track
        self.store.mark_seen(token)
        return inbound.group, plaintext

    def check_text(self, group: str, account: str, device: str, payload: GroupText | File) -> None:
        if payload.to != group or (payload.sender, payload.sender_device) != (account, device):
            raise UntrustedDevice("group message names another group or sender than its session")
        if payload.recipient or payload.recipient_device:
            raise UntrustedDevice("group message names a recipient")


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 100:
        raise LocalProtocolError("a group name has 1 to 100 characters")
    return name


def _check_members(members: list[str], *, allow_empty: bool = False) -> None:
    if len(members) > MAX_GROUP_MEMBERS:
        raise LocalProtocolError(f"a group has at most {MAX_GROUP_MEMBERS} members")
    if not members and not allow_empty:
        raise LocalProtocolError("a group needs a member")
    if len(set(members)) != len(members) or any(is_group_id(m) for m in members):
        raise UntrustedDevice("group members must be distinct accounts")


def _check_transition(old: list[str], update: GroupUpdate, account: str) -> None:
    before, after = set(old), set(update.members)
    ok = {
        "create": False,
        "rename": after == before,
        "add": after >= before,
        "remove": after <= before and account in after,
        "leave": after == before - {account},
    }[update.action]
    if not ok:
        raise UntrustedDevice(f"group change does not match its action ({update.action})")


def describe(update: GroupUpdate) -> str:
    """The line a group change leaves in the group's history."""
    match update.action:
        case "create":
            return f'* created the group "{update.name}"'
        case "rename":
            return f'* renamed the group to "{update.name}"'
        case "leave":
            return "* left the group"
        case _:
            return f"* {'added' if update.action == 'add' else 'removed'} members; now: " + (
                ", ".join(update.members)
            )
