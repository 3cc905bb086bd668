"""Store-and-forward mailbox with group commit; announces committed envelopes on the bus.

Theory of operation: a send is acknowledged only once its envelopes are committed. Deposits and
acknowledgements queue up and are written by one commit task, one store call (one transaction)
per batch: what arrives while a commit is in flight goes into the next one (group commit), which
is what makes durable storage cheap, and costs one trip to the store's thread per batch, not per
message. After each commit, every new envelope is announced on the delivery bus
(``server/delivery``); a device's connection reads what it has not yet delivered from the store.
Acknowledged envelopes are deleted; unacknowledged ones expire after ``envelope_ttl_s``.

A request that fails fails alone: when a shared transaction fails, each request is committed
again on its own, so one bad deposit or ack cannot fail the others of its batch. A device's
backlog is read in pages (``pending``), bounded in count and bytes.

Quotas: each device's stored envelopes and bytes are kept as upper bounds (acks do not lower
them) and made exact from the store only when they reach the quota. One node keeps them in
memory. Several nodes (``MailboxCounters``, Redis) keep them in Redis, raised by every node's
deposits, so a mailbox holds its quota across nodes; the node that finds a bound at the quota
counts in the store and writes the exact value back, and refuses a mailbox found full without
counting again for ``mailbox_full_recheck_s``; a counter that Redis lost (expired, evicted,
restarted) is raised by the store's count at its first use. Deposits in flight on other nodes while one
counts are not in the store yet: the quota may be passed by what is in flight, never N times.
While Redis does not answer, each node falls back to its own bounds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from kluis.errors import QuotaExceeded
from kluis.server.batching import GroupCommit
from kluis.server.config import Limits
from kluis.server.delivery.protocol import DeliveryBus
from kluis.server.store.protocol import Store

_Deposit = tuple[list[tuple[str, bytes]], "asyncio.Future[list[int]]"]
_Ack = tuple[list[tuple[str, int]], "asyncio.Future[None]"]


class MailboxCounters(Protocol):
    """Stored envelopes and bytes per device (upper bounds), shared by the nodes."""

    def count(self, items: list[tuple[str, int]]) -> Awaitable[list[tuple[int, int, bool]] | None]:
        """Add one envelope of each (device, bytes): the bounds after it and whether the
        counter was new (then it counts nothing before); None: unavailable."""
        ...

    async def set_count(self, device: str, count: int, size: int) -> None:
        """Set a device's bounds to what the store counted."""
        ...

    async def add_count(self, device: str, count: int, size: int) -> None:
        """Raise a device's bounds (by what the store counted, for a new counter)."""
        ...


class Mailbox:
    def __init__(
        self,
        store: Store,
        limits: Limits,
        clock: Callable[[], float],
        bus: DeliveryBus,
        counters: MailboxCounters | None = None,
    ) -> None:
        self._store = store
        self._limits = limits
        self._clock = clock
        self._bus = bus
        self._counts: dict[str, int] = {}  # stored envelopes per device (upper bound), lazily
        self._bytes: dict[str, int] = {}  # their body bytes (upper bound), alongside _counts
        self._exact: set[str] = set()  # devices whose count has been exact since their last ack
        self._deposits: list[_Deposit] = []
        self._acks: list[_Ack] = []
        self._batch = GroupCommit(self._commit_queued, lambda: bool(self._deposits or self._acks))
        self._counters = counters
        self._full_until: dict[str, float] = {}  # several nodes: found full, until then

    # ---- quota ----------------------------------------------------------------------------

    async def _full(self, device_id: str, size: int) -> bool:
        """Would one more envelope of ``size`` bytes exceed the device's quota (count or bytes)?

        The stored count and bytes are upper bounds: acks do not lower them. Counting in the
        database on every send after an ack cost more than the insert itself, so the bounds are
        made exact (counted) only when they reach the quota.
        """
        limits = self._limits
        n, b = self._counts.get(device_id), self._bytes.get(device_id, 0)
        over = n is None or n >= limits.mailbox_quota or b + size > limits.mailbox_quota_bytes
        if over and device_id not in self._exact:
            # What is committed; a batch still in flight is not counted (a soft limit).
            n = self._counts[device_id] = await self._store.count_envelopes(device_id)
            b = self._bytes[device_id] = await self._store.envelope_bytes(device_id)
            self._exact.add(device_id)
        assert n is not None
        return n >= limits.mailbox_quota or b + size > limits.mailbox_quota_bytes

    def forget(self, device_id: str) -> None:
        self._counts.pop(device_id, None)
        self._bytes.pop(device_id, None)
        self._exact.discard(device_id)

    async def sweep(self) -> int:
        """Delete expired envelopes and device links; return how many envelopes expired."""
        envelopes, _links = await self._store.sweep(int(self._clock()))
        if envelopes:
            self._exact.clear()  # no count is known to be exact any more: room again
        return envelopes

    async def maintenance(self) -> None:
        """The store's housekeeping (SQLite: fold the WAL of recent deposits and deletions)."""
        await self._store.maintenance()

    # ---- deposit / ack with group commit --------------------------------------------------

    async def _check_shared(
        self, items: list[tuple[str, bytes]], bounds: list[tuple[int, int, bool]]
    ) -> None:
        """Several nodes: ``bounds`` are the shared counters with ``items`` added.

        A new counter (expired, evicted, Redis restarted) counted only this envelope: the
        store's count is added to it, never set, so deposits counted meanwhile by other nodes
        stay counted (twice at worst: a bound too high only brings the next exact count
        sooner). A counter at the quota is set to the store's exact count."""
        assert self._counters is not None
        limits, now = self._limits, self._clock()
        for (device_id, body), (n, b, new) in zip(items, bounds, strict=True):
            if not new and n <= limits.mailbox_quota and b <= limits.mailbox_quota_bytes:
                continue
            if self._full_until.get(device_id, float("-inf")) > now:
                raise QuotaExceeded("the recipient's mailbox is full; try again later")
            stored = await self._store.count_envelopes(device_id)
            stored_bytes = await self._store.envelope_bytes(device_id)
            full = (
                stored >= limits.mailbox_quota
                or stored_bytes + len(body) > limits.mailbox_quota_bytes
            )
            if new:
                await self._counters.add_count(device_id, stored, stored_bytes)
            if full:
                if len(self._full_until) >= 4096:
                    self._full_until = {d: t for d, t in self._full_until.items() if t > now}
                self._full_until[device_id] = now + limits.mailbox_full_recheck_s
                if not new:
                    await self._counters.set_count(device_id, stored, stored_bytes)
                raise QuotaExceeded("the recipient's mailbox is full; try again later")
            if not new:
                await self._counters.set_count(device_id, stored + 1, stored_bytes + len(body))

    async def deposit(self, items: list[tuple[str, bytes]]) -> list[int]:
        """Store envelopes (device, body); return their wire ids once they are committed."""
        if self._counters is None or not await self._shared_admits(items):
            limits = self._limits
            counts, sizes = self._counts, self._bytes
            for device_id, body in items:
                # The usual case is decided by the bounds alone, without an await (see _full).
                n = counts.get(device_id)
                if (
                    n is None
                    or n >= limits.mailbox_quota
                    or sizes.get(device_id, 0) + len(body) > limits.mailbox_quota_bytes
                ) and await self._full(device_id, len(body)):
                    raise QuotaExceeded("the recipient's mailbox is full; try again later")
            for device_id, body in items:
                counts[device_id] = counts.get(device_id, 0) + 1
                sizes[device_id] = sizes.get(device_id, 0) + len(body)
        fut: asyncio.Future[list[int]] = self._batch.future()
        self._deposits.append((items, fut))
        self._batch.kick()
        return await fut

    async def _shared_admits(self, items: list[tuple[str, bytes]]) -> bool:
        """Several nodes: True if the shared counters admit ``items`` (QuotaExceeded if not),
        False if they are unavailable (then this node's own bounds decide)."""
        assert self._counters is not None
        bounds = await self._counters.count([(d, len(b)) for d, b in items])
        if bounds is None:
            return False
        await self._check_shared(items, bounds)
        return True

    async def acknowledge(self, device_id: str, ids: list[int]) -> None:
        fut: asyncio.Future[None] = self._batch.future()
        self._acks.append(([(device_id, i) for i in ids], fut))
        self._batch.kick()
        await fut

    async def _commit_queued(self) -> None:
        deposits, self._deposits = self._deposits, []
        acks, self._acks = self._acks, []
        await self._flush(deposits, acks)

    async def _flush(self, deposits: list[_Deposit], acks: list[_Ack]) -> None:
        """Commit a batch of deposits and acks in one transaction, then answer and announce."""
        # Whole hours: an expiry to the second would date each deposit and pair envelopes
        # deposited together (a recipient's and the sender's copy for another device).
        expires = -(-(int(self._clock()) + self._limits.envelope_ttl_s) // 3600) * 3600
        if await self._commit(deposits, acks, expires, alone=len(deposits) + len(acks) == 1):
            return
        # The shared transaction failed and changed nothing: each request again, on its own,
        # so that only the one at fault fails.
        for deposit in deposits:
            await self._commit([deposit], [], expires, alone=True)
        for ack in acks:
            await self._commit([], [ack], expires, alone=True)

    async def _commit(
        self, deposits: list[_Deposit], acks: list[_Ack], expires: int, *, alone: bool
    ) -> bool:
        """One transaction for these requests, then answers and announcements.

        False (nothing answered) if it failed and the requests were not ``alone``.
        """
        rows = [(d, expires, b) for items, _ in deposits for d, b in items]
        ack_rows = [r for items, _ in acks for r in items]
        try:
            ids = await self._store.write_envelopes(rows, ack_rows)
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
        announce = self._bus.announce
        for (device_id, _, body), env_id in zip(rows, ids, strict=True):
            announce(device_id, env_id, body)
        for device_id, _ in ack_rows:
            self._exact.discard(device_id)  # the bound in _counts may now be above the truth
        for _, ack_fut in acks:
            if not ack_fut.done():
                ack_fut.set_result(None)
        return True

    async def pending(
        self, device_id: str, after_id: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        """The next page of a device's backlog: at most ``push_batch`` envelopes and
        ``max_bytes`` of bodies (at least one envelope, however large)."""
        return await self._store.envelopes_after(
            device_id, after_id, int(self._clock()), self._limits.push_batch, max_bytes
        )
