"""Store-and-forward mailbox with group commit and push to connected devices.

Theory of operation: a send is acknowledged only once its envelopes are committed. Deposits and
acknowledgements that arrive in the same event-loop turn share one SQLite transaction (group
commit), which is what makes durable storage cheap. After each commit, envelopes for connected
devices are pushed through the delivery registry; the rest wait until the device connects.
Acknowledged envelopes are deleted; unacknowledged ones expire after ``envelope_ttl_s``.

A request that fails fails alone: when a shared transaction fails, each request is committed
again on its own, so one bad deposit or ack cannot fail the others of its turn. A device's
backlog is read in pages (``pending``), bounded in count and bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from kluis.errors import QuotaExceeded
from kluis.server.config import Limits
from kluis.server.store import SqliteStore


class Recipient(Protocol):
    def push(self, envelope_id: int, body: bytes) -> None: ...


class Mailbox:
    def __init__(self, store: SqliteStore, limits: Limits, clock: Callable[[], float]) -> None:
        self._store = store
        self._limits = limits
        self._clock = clock
        self._online: dict[str, Recipient] = {}
        self._counts: dict[str, int] = {}  # stored envelopes per device (upper bound), lazily
        self._bytes: dict[str, int] = {}  # their body bytes (upper bound), alongside _counts
        self._exact: set[str] = set()  # devices whose count has been exact since their last ack
        self._deposits: list[tuple[list[tuple[str, bytes]], asyncio.Future[list[int]]]] = []
        self._acks: list[tuple[list[tuple[str, int]], asyncio.Future[None]]] = []
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- delivery registry ----------------------------------------------------------------

    def attach(self, device_id: str, recipient: Recipient) -> Recipient | None:
        """Route pushes for ``device_id`` to ``recipient``; return the one it replaces."""
        old = self._online.get(device_id)
        self._online[device_id] = recipient
        return old

    def detach(self, device_id: str, recipient: Recipient) -> None:
        if self._online.get(device_id) is recipient:
            del self._online[device_id]

    def is_online(self, device_id: str) -> bool:
        return device_id in self._online

    @property
    def online_count(self) -> int:
        return len(self._online)

    # ---- quota ----------------------------------------------------------------------------

    def _full(self, device_id: str, size: int) -> bool:
        """Would one more envelope of ``size`` bytes exceed the device's quota (count or bytes)?

        The stored count and bytes are upper bounds: acks do not lower them. Counting in the
        database on every send after an ack cost more than the insert itself, so the bounds are
        made exact (counted) only when they reach the quota.
        """
        limits = self._limits
        n, b = self._counts.get(device_id), self._bytes.get(device_id, 0)
        over = n is None or n >= limits.mailbox_quota or b + size > limits.mailbox_quota_bytes
        if over and device_id not in self._exact:
            n = self._counts[device_id] = self._store.count_envelopes(device_id)
            b = self._bytes[device_id] = self._store.envelope_bytes(device_id)
            self._exact.add(device_id)
        assert n is not None
        return n >= limits.mailbox_quota or b + size > limits.mailbox_quota_bytes

    def forget(self, device_id: str) -> None:
        self._counts.pop(device_id, None)
        self._bytes.pop(device_id, None)
        self._exact.discard(device_id)

    def expired(self) -> None:
        """The sweeper deleted envelopes: no count is known to be exact any more."""
        self._exact.clear()

    # ---- deposit / ack with group commit --------------------------------------------------

    def deposit(self, items: list[tuple[str, bytes]]) -> asyncio.Future[list[int]]:
        """Queue envelopes (device, body); the future resolves once they are committed."""
        for device_id, body in items:
            if self._full(device_id, len(body)):
                raise QuotaExceeded("the recipient's mailbox is full; try again later")
        for device_id, body in items:
            self._counts[device_id] += 1
            self._bytes[device_id] = self._bytes.get(device_id, 0) + len(body)
        fut: asyncio.Future[list[int]] = self._running_loop().create_future()
        self._deposits.append((items, fut))
        self._schedule()
        return fut

    def acknowledge(self, device_id: str, ids: list[int]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self._running_loop().create_future()
        self._acks.append(([(device_id, i) for i in ids], fut))
        self._schedule()
        return fut

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        # asyncio.get_running_loop() makes a getpid() system call on every call (fork check);
        # at two calls per message that was a tenth of the server's time (py-spy).
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _schedule(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Commit every queued deposit and ack in one transaction, then answer and push."""
        self._flush_scheduled = False
        deposits, self._deposits = self._deposits, []
        acks, self._acks = self._acks, []
        # Whole hours: an expiry to the second would date each deposit and pair envelopes
        # deposited together (a recipient's and the sender's copy for another device).
        expires = -(-(int(self._clock()) + self._limits.envelope_ttl_s) // 3600) * 3600
        if self._commit(deposits, acks, expires, alone=len(deposits) + len(acks) == 1):
            return
        # The shared transaction failed and changed nothing: each request again, on its own,
        # so that only the one at fault fails.
        for deposit in deposits:
            self._commit([deposit], [], expires, alone=True)
        for ack in acks:
            self._commit([], [ack], expires, alone=True)

    def _commit(
        self,
        deposits: list[tuple[list[tuple[str, bytes]], asyncio.Future[list[int]]]],
        acks: list[tuple[list[tuple[str, int]], asyncio.Future[None]]],
        expires: int,
        *,
        alone: bool,
    ) -> bool:
        """One transaction for these requests, then answers and pushes.

        False (nothing answered) if it failed and the requests were not ``alone``.
        """
        rows = [(d, expires, b) for items, _ in deposits for d, b in items]
        ack_rows = [r for items, _ in acks for r in items]
        try:
            with self._store.transaction():
                ids = self._store.insert_envelopes(rows) if rows else []
                if ack_rows:
                    self._store.delete_envelopes(ack_rows)
        except Exception as exc:  # nothing was committed
            if not alone:
                return False
            for items, fut in deposits:  # undo the counts, fail the caller
                for d, b in items:
                    if d in self._counts:  # not forgotten (revoked) meanwhile
                        self._counts[d] -= 1
                        self._bytes[d] -= len(b)
                if not fut.done():
                    fut.set_exception(exc)
            for _, ack_fut in acks:
                if not ack_fut.done():
                    ack_fut.set_exception(exc)
            return True
        pos = 0
        for items, fut in deposits:
            mine = ids[pos : pos + len(items)]
            pos += len(items)
            if not fut.done():
                fut.set_result(mine)
        online = self._online
        for (device_id, _, body), env_id in zip(rows, ids, strict=True):
            recipient = online.get(device_id)
            if recipient is not None:
                recipient.push(env_id, body)
        for device_id, _ in ack_rows:
            self._exact.discard(device_id)  # the bound in _counts may now be above the truth
        for _, ack_fut in acks:
            if not ack_fut.done():
                ack_fut.set_result(None)
        return True

    def pending(self, device_id: str, after_id: int, max_bytes: int) -> list[tuple[int, bytes]]:
        """The next page of a device's backlog: at most ``push_batch`` envelopes and
        ``max_bytes`` of bodies (at least one envelope, however large)."""
        return self._store.envelopes_after(
            device_id, after_id, int(self._clock()), self._limits.push_batch, max_bytes
        )
