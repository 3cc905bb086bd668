"""What the client core needs from a profile store: the seam between core and storage.

Theory of operation: the core keeps everything it knows in a store of this shape — named records
(identity, pins, recovery state, quarantine), Olm sessions per peer device, message history per
conversation, and the set of seen envelope and message IDs. Stores are synchronous and local; the
core groups the writes of one state change in :meth:`ClientStore.transaction` and commits before
anything it returns goes on the wire. Several state changes may share one transaction (a batch of
received envelopes: one durable commit); each then sits in a :meth:`ClientStore.savepoint`, so
that one that fails rolls back only its own writes. Values are opaque bytes: a store encrypts them at rest (the
SQLite profile) or simply keeps them (the in-memory store of the tests).

Implementations: :class:`kluis.client.store.sqlite.ProfileStore` (the encrypted profile on disk)
and :class:`kluis.client.store.memory.MemoryStore` (tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol


class ClientStore(Protocol):
    """A device's profile. Every method that writes joins the current transaction, if any."""

    @property
    def pickle_key(self) -> bytes:
        """32 bytes that encrypt vodozemac pickles (the Olm account and sessions)."""
        ...

    def transaction(self) -> AbstractContextManager[None]:
        """Nestable; only the outermost level commits, and an exception rolls it all back."""
        ...

    def savepoint(self) -> AbstractContextManager[None]:
        """Like :meth:`transaction`, except that inside one, an exception rolls back only the
        writes made in this block (then propagates), and the enclosing transaction goes on."""
        ...

    def blind(self, data: str | bytes) -> bytes:
        """A keyed digest of ``data``: an index that does not reveal what it stands for."""
        ...

    # ---- named records

    def get(self, name: str) -> bytes | None: ...

    def put(self, name: str, value: bytes) -> None: ...

    def names(self, prefix: str) -> list[str]:
        """The names of the records that start with ``prefix``."""
        ...

    # ---- Olm sessions, per peer device ("account/device")

    def sessions(self, peer: str) -> list[tuple[int, bytes]]:
        """(session id, pickle) for ``peer``, most recently used first."""
        ...

    def save_session(self, row_id: int | None, peer: str, value: bytes, used: int) -> int:
        """Insert (``row_id`` None) or replace a session; ``used`` orders them (milliseconds)."""
        ...

    def drop_sessions(self, peer: str) -> None: ...

    # ---- history and replay protection

    def add_message(self, peer: str, value: bytes) -> None: ...

    def messages(self, peer: str | None = None) -> list[bytes]:
        """In the order they were added; all conversations when ``peer`` is None."""
        ...

    def message_rows(self, peer: str | None = None, after: int = 0) -> list[tuple[int, bytes]]:
        """(seq, value) in the order they were added, only those with seq above ``after``; seq
        grows with each message added."""
        ...

    def delete_messages(self, seqs: Sequence[int]) -> None:
        """Remove these messages (disappearing messages); unknown seqs are ignored."""
        ...

    def delete(self, name: str) -> None:
        """Remove a named record (nothing if there is none)."""
        ...

    def scrub(self) -> None:
        """Outside a transaction, after deletions: leave no copy of deleted rows in the store's
        files (the SQLite profile overwrites freed pages and empties its write-ahead log)."""
        ...

    def seen(self, token: bytes) -> bool: ...

    def mark_seen(self, token: bytes) -> None: ...

    # ---- life cycle

    def close(self) -> None: ...

    def destroy(self) -> None:
        """Close and forget everything (a profile whose set-up failed)."""
        ...
