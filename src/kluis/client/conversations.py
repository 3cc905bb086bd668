"""The conversation list: last activity, unread counts, and what "read" means.

Theory of operation: a message is *unread* when another account wrote it (our own messages and
system lines never are) and it was stored after the user last read its conversation. Reading
(:meth:`Conversations.mark_read`: the client calls it when ``history`` or ``inbox`` shows a
conversation, or the application calls ``KluisClient.mark_read``) moves the conversation's read
mark to its newest stored message, on this device only (each device keeps its own mark, in the
profile record ``read``), and queues read receipts for the messages it read, unless the user
turned read receipts off. Marks are store sequence numbers, not clocks, so a peer's clock cannot
make a message look read or unread.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec

from kluis.client.records import StoredMessage, clamp_ts

if TYPE_CHECKING:
    from kluis.client.core import ClientCore
    from kluis.client.receipts import Receipts

__all__ = ["ConversationInfo", "Conversations"]

_enc = msgspec.msgpack.Encoder()
_marks_dec = msgspec.msgpack.Decoder(dict[str, int])
_stored_dec = msgspec.msgpack.Decoder(StoredMessage)


@dataclass(frozen=True, slots=True)
class ConversationInfo:
    conversation: str  # 1:1: the other account's ID
    unread: int
    last_activity: datetime  # the newest stored message's time


class Conversations:
    RECORD = "read"

    def __init__(self, core: ClientCore, receipts: Receipts) -> None:
        self._core, self._receipts = core, receipts

    def _marks(self) -> dict[str, int]:
        raw = self._core.store.get(self.RECORD)
        return _marks_dec.decode(raw) if raw else {}

    def _unread(self, m: StoredMessage) -> bool:
        return m.sender != self._core.account_id and m.kind == ""

    def list(self) -> list[ConversationInfo]:
        """Every conversation with a stored message, most recent activity first."""
        marks = self._marks()
        last: dict[str, int] = {}
        unread: dict[str, int] = defaultdict(int)
        for seq, raw in self._core.store.message_rows(None):
            m = _stored_dec.decode(raw)
            last[m.conversation] = max(last.get(m.conversation, 0), clamp_ts(m.ts))
            if seq > marks.get(m.conversation, 0) and self._unread(m):
                unread[m.conversation] += 1
        out = [
            ConversationInfo(c, unread[c], datetime.fromtimestamp(ts / 1000, UTC))
            for c, ts in last.items()
        ]
        return sorted(out, key=lambda i: (i.last_activity, i.conversation), reverse=True)

    def unread(self, conversation: str) -> int:
        for info in self.list():
            if info.conversation == conversation:
                return info.unread
        return 0

    def mark_read(self, conversation: str | None = None) -> int:
        """Mark ``conversation`` (all when None) read; queue read receipts. Returns how many
        messages became read."""
        store = self._core.store
        with store.transaction():
            marks = self._marks()
            # Rows up to the conversation's mark change nothing: read only those after it
            # (the app marks the open chat read at each message; history may be long).
            after = marks.get(conversation, 0) if conversation is not None else 0
            rows = store.message_rows(conversation, after)
            newly: dict[tuple[str, str], list[bytes]] = defaultdict(list)
            count = 0
            top: dict[str, int] = {}
            for seq, raw in rows:
                m = _stored_dec.decode(raw)
                top[m.conversation] = max(top.get(m.conversation, 0), seq)
                if seq > marks.get(m.conversation, 0) and self._unread(m):
                    count += 1
                    if m.id:
                        newly[(m.sender, m.conversation)].append(m.id)
            changed = {c: s for c, s in top.items() if s > marks.get(c, 0)}
            if changed:
                marks.update(changed)
                store.put(self.RECORD, _enc.encode(marks))
            if self._receipts.read_enabled:
                for (sender, conv), ids in newly.items():
                    self._receipts.queue("read", sender, conv, ids)
        return count
