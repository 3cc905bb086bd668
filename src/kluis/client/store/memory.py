"""A profile held in memory: the same contract as the encrypted SQLite profile, for tests.

Transactions snapshot the state at the outermost level and restore it on an exception, as a
database rollback would; the core relies on that (a failed decryption must forget the session
state it advanced). Nothing is encrypted: nothing is written anywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from kluis.errors import LocalProtocolError


class MemoryStore:
    """Implements :class:`kluis.client.store.protocol.ClientStore`."""

    def __init__(self, pickle_key: bytes | None = None) -> None:
        self._pickle_key = pickle_key or secrets.token_bytes(32)
        self._mac_key = hmac.new(self._pickle_key, b"kluis-memory-blind", hashlib.sha256).digest()
        self._kv: dict[str, bytes] = {}
        self._sessions: dict[int, tuple[str, int, bytes]] = {}  # id -> (peer, used, pickle)
        self._messages: dict[int, tuple[str, bytes]] = {}  # seq -> (peer, value)
        self._next_message = 1  # never rolled back: a gap in seqs is harmless
        self._seen: set[bytes] = set()
        self._next_session = 1
        self._depth = 0
        self._closed = False
        self.commits = 0  # outermost transactions committed (for tests and measurements)

    @property
    def pickle_key(self) -> bytes:
        return self._pickle_key

    def _check(self) -> None:
        if self._closed:
            raise LocalProtocolError("the profile is closed")

    # ---- transactions -------------------------------------------------------------------------

    def _snapshot(self) -> tuple[Any, ...]:
        return (
            dict(self._kv),
            dict(self._sessions),
            dict(self._messages),
            set(self._seen),
            self._next_session,
        )

    def transaction(self) -> AbstractContextManager[None]:
        return self._level(outermost_only=True)

    def savepoint(self) -> AbstractContextManager[None]:
        return self._level(outermost_only=False)

    @contextmanager
    def _level(self, *, outermost_only: bool) -> Iterator[None]:
        """A transaction level: restores its snapshot on an exception (a savepoint's at any
        depth, a transaction's only at the outermost)."""
        self._check()
        snapshot = None
        if self._depth == 0 or not outermost_only:
            snapshot = self._snapshot()
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            if snapshot is not None:
                self._kv, self._sessions, self._messages, self._seen, self._next_session = snapshot
            raise
        self._depth -= 1
        if self._depth == 0:
            self.commits += 1

    def blind(self, data: str | bytes) -> bytes:
        raw = data.encode() if isinstance(data, str) else data
        return hmac.new(self._mac_key, raw, hashlib.sha256).digest()

    # ---- named records ------------------------------------------------------------------------

    def get(self, name: str) -> bytes | None:
        self._check()
        return self._kv.get(name)

    def put(self, name: str, value: bytes) -> None:
        with self.transaction():
            self._kv[name] = bytes(value)

    def names(self, prefix: str) -> list[str]:
        self._check()
        return sorted(n for n in self._kv if n.startswith(prefix))

    # ---- Olm sessions -------------------------------------------------------------------------

    def sessions(self, peer: str) -> list[tuple[int, bytes]]:
        self._check()
        rows = [(used, i, v) for i, (p, used, v) in self._sessions.items() if p == peer]
        rows.sort(reverse=True)
        return [(i, v) for _, i, v in rows]

    def save_session(self, row_id: int | None, peer: str, value: bytes, used: int) -> int:
        with self.transaction():
            if row_id is None:
                row_id, self._next_session = self._next_session, self._next_session + 1
            self._sessions[row_id] = (peer, used, bytes(value))
        return row_id

    def drop_sessions(self, peer: str) -> None:
        with self.transaction():
            self._sessions = {i: s for i, s in self._sessions.items() if s[0] != peer}

    # ---- history and replay protection --------------------------------------------------------

    def add_message(self, peer: str, value: bytes) -> None:
        with self.transaction():
            self._messages[self._next_message] = (peer, bytes(value))
            self._next_message += 1

    def messages(self, peer: str | None = None) -> list[bytes]:
        return [v for _, v in self.message_rows(peer)]

    def message_rows(self, peer: str | None = None, after: int = 0) -> list[tuple[int, bytes]]:
        self._check()
        rows = sorted(self._messages.items())
        return [(i, v) for i, (p, v) in rows if i > after and (peer is None or p == peer)]

    def delete_messages(self, seqs: Sequence[int]) -> None:
        with self.transaction():
            for seq in seqs:
                self._messages.pop(seq, None)

    def delete(self, name: str) -> None:
        with self.transaction():
            self._kv.pop(name, None)

    def scrub(self) -> None:
        self._check()  # nothing is written anywhere: nothing to overwrite

    def seen(self, token: bytes) -> bool:
        self._check()
        return self.blind(token) in self._seen

    def mark_seen(self, token: bytes) -> None:
        with self.transaction():
            self._seen.add(self.blind(token))

    # ---- life cycle ---------------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True

    def destroy(self) -> None:
        self.close()
        self._kv.clear()
        self._sessions.clear()
        self._messages.clear()
        self._seen.clear()
