"""Delivered and read receipts, end to end encrypted like any message.

Theory of operation: a :class:`Receipt` names message IDs of one conversation and is sent to the
account that wrote them (all its devices). Each message we send leaves a small record
``rcpt:<digest of its ID>`` holding its conversation and receipt state, so a receipt changes
only messages we really sent in the conversation the receipt comes from: IDs we never sent, or
sent elsewhere, are ignored. States only go up (delivered, then read).

Receipts to send wait in the profile record ``receipts:pending`` (persist before you send), one
entry per (status, account, conversation), so a whole receive batch answers with one receipt per
conversation; the client sends them when connected (:meth:`pending` / :meth:`sent`). Delivered
receipts go out for every text from another account as it is stored; read receipts when the user
reads a conversation (``kluis.client.conversations``), unless read receipts are off — the
setting is local, in the record ``settings:receipts``. Delivered receipts are always sent.
Nothing answers a receipt (no loops).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import msgspec

from kluis.client.events import FeatureEvent, ReceiptReceived
from kluis.protocol.payload import Receipt

if TYPE_CHECKING:
    from kluis.client.core import ClientCore
    from kluis.client.records import Sealed

__all__ = ["STATES", "PendingReceipt", "Receipts"]

Status = Literal["delivered", "read"]
STATES = ("", "delivered", "read")  # index = rank
MAX_IDS = 1_000  # per receipt payload (the payload's limit)


class _Tracked(msgspec.Struct, frozen=True):
    conversation: str
    state: int = 0


class PendingReceipt(msgspec.Struct, frozen=True):
    status: Status
    account: str  # who wrote the messages: the receipt goes to this account
    conversation: str
    ids: list[bytes]


class _Settings(msgspec.Struct, frozen=True):
    read_receipts: bool = True


_enc = msgspec.msgpack.Encoder()
_tracked_dec = msgspec.msgpack.Decoder(_Tracked)
_pending_dec = msgspec.msgpack.Decoder(list[PendingReceipt])
_settings_dec = msgspec.msgpack.Decoder(_Settings)


class Receipts:
    PENDING = "receipts:pending"
    SETTINGS = "settings:receipts"

    def __init__(self, core: ClientCore, events: list[FeatureEvent]) -> None:
        self._core, self._events = core, events

    def _name(self, message_id: bytes) -> str:
        return "rcpt:" + self._core.store.blind(b"rcpt:" + message_id).hex()

    # ---- settings ----------------------------------------------------------------------------

    @property
    def read_enabled(self) -> bool:
        raw = self._core.store.get(self.SETTINGS)
        return _settings_dec.decode(raw).read_receipts if raw else True

    def set_read_enabled(self, on: bool) -> None:
        self._core.store.put(self.SETTINGS, _enc.encode(_Settings(read_receipts=on)))

    # ---- our sent messages -------------------------------------------------------------------

    def track(self, message_id: bytes, conversation: str) -> None:
        """A message we sent (or our other device sent) in ``conversation``."""
        name = self._name(message_id)
        if self._core.store.get(name) is None:
            self._core.store.put(name, _enc.encode(_Tracked(conversation)))

    def state(self, message_id: bytes) -> str:
        raw = self._core.store.get(self._name(message_id)) if message_id else None
        return STATES[_tracked_dec.decode(raw).state] if raw else ""

    def forget(self, message_ids: list[bytes]) -> None:
        for message_id in message_ids:
            self._core.store.delete(self._name(message_id))

    def apply(self, s: Sealed, payload: Receipt) -> None:
        """A receipt from another account: update the messages we sent in that conversation."""
        if s.account == self._core.account_id:
            return  # our own devices send no receipts
        conversation = self._core.conversation_of(payload)
        rank = STATES.index(payload.status)
        changed: list[bytes] = []
        for message_id in dict.fromkeys(payload.ids):
            name = self._name(message_id)
            raw = self._core.store.get(name)
            if raw is None:
                continue  # not a message we sent (or it has disappeared)
            tracked = _tracked_dec.decode(raw)
            if tracked.conversation != conversation:
                continue  # a receipt only speaks for its own conversation
            if rank > tracked.state:
                self._core.store.put(name, _enc.encode(_Tracked(conversation, rank)))
            changed.append(message_id)
        if changed:
            self._events.append(
                ReceiptReceived(conversation, payload.status, s.account, tuple(changed))
            )

    # ---- receipts to send --------------------------------------------------------------------

    def queue(self, status: Status, account: str, conversation: str, ids: list[bytes]) -> None:
        if not ids or account == self._core.account_id:
            return
        with self._core.store.transaction():
            pending = self._pending()
            for i, p in enumerate(pending):
                if (p.status, p.account, p.conversation) == (status, account, conversation):
                    merged = list(dict.fromkeys([*p.ids, *ids]))
                    pending[i] = PendingReceipt(status, account, conversation, merged)
                    break
            else:
                pending.append(PendingReceipt(status, account, conversation, list(ids)))
            self._core.store.put(self.PENDING, _enc.encode(pending))

    def _pending(self) -> list[PendingReceipt]:
        raw = self._core.store.get(self.PENDING)
        return _pending_dec.decode(raw) if raw else []

    def pending(self) -> list[tuple[PendingReceipt, list[Receipt]]]:
        """What to send: each pending entry and its payloads (at most MAX_IDS IDs each)."""
        out = []
        for p in self._pending():
            payloads = [
                Receipt(
                    id=self._core._random(16),
                    ts=self._core._now_ms(),
                    to=p.conversation,
                    status=p.status,
                    ids=p.ids[i : i + MAX_IDS],
                )
                for i in range(0, len(p.ids), MAX_IDS)
            ]
            out.append((p, payloads))
        return out

    def sent(self, done: PendingReceipt) -> None:
        """``done`` went out (or cannot ever): drop it, keeping what was queued meanwhile."""
        with self._core.store.transaction():
            kept: list[PendingReceipt] = []
            done_ids = set(done.ids)
            for p in self._pending():
                if (p.status, p.account, p.conversation) == (
                    done.status,
                    done.account,
                    done.conversation,
                ):
                    rest = [i for i in p.ids if i not in done_ids]
                    if rest:
                        kept.append(PendingReceipt(p.status, p.account, p.conversation, rest))
                else:
                    kept.append(p)
            if kept:
                self._core.store.put(self.PENDING, _enc.encode(kept))
            else:
                self._core.store.delete(self.PENDING)
