"""The outbox: messages whose send could not reach the server, kept to send again.

Theory of operation: a send that fails with a :class:`~kluis.errors.TransportError` (no
connection, a timeout, a connection lost mid-request) leaves its *payload* here, in the profile's
named records (``outbox/<id>``, encrypted at rest like every record), with the conversation and
the time it was written. Envelopes are never kept: they are encrypted again at each attempt, so
the Olm and Megolm sessions stay in step with what really went out. The payload keeps its ID and
time, so a recipient that got an earlier attempt (the server stored it, the answer was lost)
sees the retry as a duplicate and shows it once. A send the server *refused* (a typed remote
error) is not kept: trying again would be refused again.

Sans-IO: this module reads and writes the store and nothing else; ``KluisClient`` sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from kluis.client.store.protocol import ClientStore
from kluis.protocol.payload import GroupText, Text

_PREFIX = "outbox/"

Waiting = Text | GroupText


class _Entry(msgspec.Struct, frozen=True):
    payload: Waiting
    queued: int  # ms since the epoch: when it was kept
    order: int = 0  # the order they were kept in: they go in that order


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(_Entry)


@dataclass(frozen=True, slots=True)
class Pending:
    """A message waiting in the outbox."""

    id: bytes
    conversation: str
    time: datetime  # when it was written (the recipient sees this time)
    text: str
    payload: Waiting


class Outbox:
    def __init__(self, store: ClientStore) -> None:
        self._store = store

    def keep(self, payload: Waiting, now_ms: int) -> None:
        """Keep ``payload`` to send again (the same ID: a second keep replaces the first and
        keeps its place)."""
        entries = self._entries()
        order = next(
            (e.order for e in entries if e.payload.id == payload.id),
            max((e.order for e in entries), default=0) + 1,
        )
        entry = _Entry(payload, now_ms, order)
        self._store.put(_PREFIX + payload.id.hex(), _enc.encode(entry))

    def pending(self) -> list[Pending]:
        """What waits, in the order it was kept (the order it goes in)."""
        out = []
        for entry in self._entries():
            p = entry.payload
            when = datetime.fromtimestamp(p.ts / 1000, UTC)
            out.append(Pending(p.id, p.to, when, p.text, p))
        return out

    def _entries(self) -> list[_Entry]:
        out = []
        for name in self._store.names(_PREFIX):
            raw = self._store.get(name)
            if raw is None:
                continue
            try:
                entry = _dec.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):
                self._store.delete(name)  # unreadable (written by a future version?): drop it
                continue
            out.append(entry)
        out.sort(key=lambda e: (e.order, e.queued))
        return out

    def __len__(self) -> int:
        return len(self._store.names(_PREFIX))

    def done(self, message_id: bytes) -> None:
        """Sent, or refused by the server: forget it."""
        self._store.delete(_PREFIX + message_id.hex())
