"""Group commit: what callers queue during one turn of the event loop goes out as one batch.

Theory of operation: a caller puts its request, with a future from :meth:`GroupCommit.future`,
on a queue of its owner's and calls :meth:`GroupCommit.kick`. The first kick while no batch is
running starts one flusher task; a task's first step runs after the callbacks already queued,
so every request of this loop turn is in its first batch. The flusher calls ``flush`` (which
takes everything queued so far and answers its futures) for as long as ``pending`` says more
came meanwhile, then ends; the next kick starts another. The mailbox's SQL transactions and the
shared state's Redis pipelines are batched so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


class GroupCommit:
    def __init__(self, flush: Callable[[], Awaitable[None]], pending: Callable[[], bool]) -> None:
        self._flush, self._pending = flush, pending
        self.running: asyncio.Task[None] | None = None  # the flusher, while a batch goes out
        self._loop: asyncio.AbstractEventLoop | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        # asyncio.get_running_loop() makes a getpid() system call on every call (fork check);
        # at two calls per message that was a tenth of the server's time (py-spy).
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def future(self) -> asyncio.Future[Any]:
        """A future on the running loop, for a request about to be queued."""
        return self.loop().create_future()

    def kick(self) -> None:
        """Something was queued: make sure a flusher will take it."""
        if self.running is None:
            self.running = self.loop().create_task(self._flush_all())

    async def _flush_all(self) -> None:
        try:
            while self._pending():
                await self._flush()
        finally:
            self.running = None
