"""Disappearing messages: a timer per conversation, and the sweep that deletes what expired.

Theory of operation: any member sets a conversation's timer with a :class:`Timer` payload, sent
to the conversation and to our own devices like a message; each device keeps the newest setting
(by the payload's clock, then its ID) in the profile record ``timers`` and files a system line
in the conversation's history. Every :class:`Text` carries the timer its sender saw, and that
value decides when the message disappears: ``expires = time + timer`` where ``time`` is the
message's time as this device stored it (the sender's clock, never more than the allowed skew
ahead of ours), so the sender's devices and the recipients' agree within that skew.

:meth:`Timers.sweep` deletes every stored message whose time has come, with its receipt state,
in one transaction; the profile record ``expiry`` holds the earliest expiry so that a sweep
with nothing due reads one record. The client sweeps before each operation and every second
while its event loop runs, then asks the store to scrub (see ``ClientStore.scrub``).

A peer's Timer changes only the conversation the binding checks allow it to write in (1:1: its
conversation with us); an out-of-range value does not decode (``kluis.protocol.payload``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from kluis.client.events import FeatureEvent, MessagesExpired
from kluis.client.records import Message, StoredMessage, clamp_ts
from kluis.errors import LocalProtocolError
from kluis.protocol.payload import MAX_TIMER_S, Timer

if TYPE_CHECKING:
    from kluis.client.core import ClientCore
    from kluis.client.records import Sealed

__all__ = ["MAX_TIMER_S", "MIN_TIMER_S", "Timers", "describe"]

MIN_TIMER_S = 30  # the shortest timer a user may set (tests lower Timers.min_seconds)


class _Setting(msgspec.Struct, frozen=True):
    seconds: int
    ts: int
    id: bytes


_timers_dec = msgspec.msgpack.Decoder(dict[str, _Setting])
_stored_dec = msgspec.msgpack.Decoder(StoredMessage)
_enc = msgspec.msgpack.Encoder()


def describe(seconds: int) -> str:
    """``30 s``, ``5 min``, ``2 h``, ``3 d``, ``4 weeks``, or ``off``."""
    if seconds <= 0:
        return "off"
    for unit, size in (("weeks", 604_800), ("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds % size == 0:
            count = seconds // size
            return f"{count} {'week' if unit == 'weeks' and count == 1 else unit}"
    return f"{seconds} s"


def timer_line(seconds: int) -> str:
    return f"disappearing messages: {describe(seconds)}"


class Timers:
    RECORD = "timers"
    NEXT = "expiry"  # the earliest expiry of any stored message (ms), absent: none

    def __init__(self, core: ClientCore, events: list[FeatureEvent]) -> None:
        self._core, self._events = core, events
        self.min_seconds = MIN_TIMER_S

    def _load(self) -> dict[str, _Setting]:
        raw = self._core.store.get(self.RECORD)
        return _timers_dec.decode(raw) if raw else {}

    def seconds(self, conversation: str) -> int:
        """The conversation's timer (0: off)."""
        setting = self._load().get(conversation)
        return setting.seconds if setting else 0

    def all(self) -> dict[str, int]:
        """Every conversation's timer that is on (seconds), by conversation."""
        return {c: t.seconds for c, t in sorted(self._load().items()) if t.seconds > 0}

    def check(self, seconds: int) -> int:
        if seconds != 0 and not self.min_seconds <= seconds <= MAX_TIMER_S:
            raise LocalProtocolError(
                f"a timer is 0 (off) or {self.min_seconds} to {MAX_TIMER_S} seconds (4 weeks)"
            )
        return seconds

    def new(self, conversation: str, seconds: int) -> Timer:
        """The payload that sets ``conversation``'s timer (send it, then :meth:`record_sent`)."""
        self.check(seconds)
        return Timer(
            id=self._core._random(16), ts=self._core._now_ms(), to=conversation, seconds=seconds
        )

    def record_sent(self, payload: Timer) -> Message:
        with self._core.store.transaction():
            self._core.store.mark_seen(b"msg:" + payload.id)
            return self._store(payload.to, self._core.account_id, payload, payload.ts, local=True)

    def apply(self, s: Sealed, payload: Timer, ts: int) -> Message:
        return self._store(self._core.conversation_of(payload), s.account, payload, ts)

    def _store(
        self, conversation: str, sender: str, payload: Timer, ts: int, *, local: bool = False
    ) -> Message:
        """Keep the newest setting; file the system line whatever its order of arrival."""
        timers = self._load()
        new = _Setting(seconds=payload.seconds, ts=payload.ts, id=payload.id)
        old = timers.get(conversation)
        if old is None or (new.ts, new.id) > (old.ts, old.id):
            timers[conversation] = new
            self._core.store.put(self.RECORD, _enc.encode(timers))
        m = StoredMessage(
            conversation,
            sender=sender,
            ts=ts,
            text=timer_line(payload.seconds),
            id=payload.id,
            kind="timer",
            local=local,
        )
        self._core.store.add_message(conversation, _enc.encode(m))
        return Message.from_stored(m)

    # ---- expiry ----------------------------------------------------------------------------

    def expires(self, ts: int, seconds: int) -> int:
        """When a message stored with time ``ts`` disappears (0: never); notes it for the sweep."""
        if seconds <= 0:
            return 0
        when = clamp_ts(ts + min(seconds, MAX_TIMER_S) * 1000)
        due = self._next()
        if not due or when < due:
            self._core.store.put(self.NEXT, _enc.encode(when))
        return when

    def _next(self) -> int:
        raw = self._core.store.get(self.NEXT)
        return msgspec.msgpack.decode(raw, type=int) if raw else 0

    def sweep(self) -> list[StoredMessage]:
        """Delete every message whose time has come; returns what was deleted."""
        now = self._core._now_ms()
        due = self._next()
        if not due or now < due:
            return []
        store = self._core.store
        with store.transaction():
            gone: list[int] = []
            deleted: list[StoredMessage] = []
            later = 0
            for seq, raw in store.message_rows(None):
                m = _stored_dec.decode(raw)
                if not m.expires:
                    continue
                if m.expires <= now:
                    gone.append(seq)
                    deleted.append(m)
                elif not later or m.expires < later:
                    later = m.expires
            store.delete_messages(gone)
            self._core.features.receipts.forget([m.id for m in deleted if m.id])
            if later:
                store.put(self.NEXT, _enc.encode(later))
            else:
                store.delete(self.NEXT)
        if deleted:
            self._events.append(MessagesExpired(len(deleted)))
        return deleted
