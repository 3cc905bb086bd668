"""The adapter between the app and :class:`~kluis.client.client.KluisClient`.

Theory of operation: the client does its cryptography and profile storage synchronously inside
its coroutines, so it runs on an event loop of its own, in a thread (:class:`ClientThread`);
the app's loop only awaits futures of it (from Textual workers) and so never stutters. The
operations themselves are :class:`~kluis.apps.ops.ClientOps`'s, written once for the app alone
and for the daemon. A pump task there follows ``client.events()``, reconnects with back-off and
jitter when the stream ends with ``ConnectionDown``, and hands every event to a thread-safe
callback as a :data:`BackendEvent`. Working alone, the app holds the profile's ``daemon.lock``
shared for as long as the profile is open (as a CLI command does), so ``kluis daemon`` cannot
start on it meanwhile; when a daemon holds the profile, the app attaches to it instead
(:class:`~kluis.apps.tui.remote.DaemonBackend`, the same protocol over the daemon's socket).
The app depends on the :class:`Backend` protocol only, so tests and screenshots can drive it
with a fake.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from kluis.apps.daemon import hold_shared, holder
from kluis.apps.ops import (
    BackendEvent,
    ClientOps,
    GroupAction,
    Offline,
    Online,
    Post,
    Progress,
    follow,
)
from kluis.client.backoff import Backoff, BackoffPolicy
from kluis.client.client import KluisClient
from kluis.client.groups import GroupState
from kluis.client.records import Message
from kluis.client.store import ProfileStore
from kluis.client.transport import TransportFactory, WebSocketTransport
from kluis.client.verification import Status, Verification
from kluis.crypto.profile_key import KdfParams
from kluis.errors import LocalProtocolError
from kluis.protocol.attachment import AttachmentRef

__all__ = [
    "Backend",
    "BackendEvent",
    "ClientBackend",
    "ClientThread",
    "GroupAction",
    "Offline",
    "Online",
    "Post",
    "Progress",
    "profile_exists",
]

T = TypeVar("T")


class Backend(Protocol):
    """What the app needs of a client (see :class:`ClientBackend`)."""

    @property
    def account_id(self) -> str: ...

    async def history(self, conversation: str | None = None) -> list[Message]: ...

    async def groups(self) -> list[GroupState]: ...

    async def quarantined(self) -> int: ...

    async def send(self, conversation: str, text: str, reply_to: bytes = b"") -> Message:
        """Send ``text``; ``reply_to``: the ID of the message of ``conversation`` it quotes."""

    async def create_group(self, name: str, members: list[str]) -> GroupState: ...

    async def change_group(
        self, group: str, action: GroupAction, accounts: list[str], name: str | None
    ) -> GroupState:
        """Add or remove members, rename, or leave; every member old and new hears of it."""

    async def verification_status(self, peer: str) -> tuple[Status, str]:
        """Whether ``peer`` is verified by SAS; for a broken verification, why."""

    async def start_verification(self, peer: str) -> Verification:
        """Ask ``peer`` for a SAS verification, or answer its request; the flow's changes
        arrive as VerificationChanged events."""

    async def confirm_verification(self, txn: bytes, match: bool) -> None:
        """The user compared the codes of flow ``txn``: they ``match``, or not (cancels)."""

    async def cancel_verification(self, txn: bytes) -> None:
        """The user gave flow ``txn`` up."""

    async def contacts(self) -> dict[str, str]:
        """Nicknames by account ID."""

    async def set_contact(self, account: str, name: str) -> None:
        """Name ``account`` here and on our other devices."""

    async def timers(self) -> dict[str, int]:
        """The disappearing-message timer of every conversation that has one (seconds)."""

    async def set_timer(self, conversation: str, seconds: int) -> Message:
        """Set ``conversation``'s timer (0: off); returns the system line filed in history."""

    async def mark_read(self, conversation: str) -> None:
        """The user saw ``conversation``: read receipts go out (when turned on)."""

    async def renewal_notice(self) -> str:
        """A line about the subscription's end once it is near (or past), else ""."""

    async def outbox_refused(self) -> list[tuple[str, str]]:
        """(conversation, why) for each message of the outbox the server refused when it was
        sent again (dropped from the outbox), once each."""

    async def send_file(
        self, conversation: str, path: Path, caption: str, progress: Progress
    ) -> Message:
        """Upload ``path`` encrypted and send it; ``progress`` may be called from another
        thread (the client's), so it only posts messages."""

    async def save_file(self, ref: AttachmentRef, folder: Path, progress: Progress) -> Path:
        """Fetch, check and decrypt ``ref`` into ``folder``; return the path written."""

    async def attachment_bytes(self, ref: AttachmentRef, limit: int) -> bytes:
        """Fetch, check and decrypt ``ref`` into memory (an image preview), at most ``limit``
        bytes; the file stays on the server to be saved."""

    def start(self, post: Post) -> None:
        """Connect and keep connected, handing every event to ``post`` (thread-safe)."""

    async def close(self) -> None: ...


def profile_exists(profile: Path) -> bool:
    return ProfileStore.exists(profile)


class ClientThread:
    """An event loop in a daemon thread; :meth:`call` runs a coroutine there and awaits it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kluis-client")
        self._thread.daemon = True
        self._thread.start()

    async def call(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        future = asyncio.run_coroutine_threadsafe(make(), self.loop)
        return await asyncio.wrap_future(future)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


class ClientBackend:
    """A :class:`KluisClient` living on a :class:`ClientThread`."""

    def __init__(
        self,
        thread: ClientThread,
        client: KluisClient,
        *,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
    ) -> None:
        self._thread, self._client = thread, client
        self._ops = ClientOps(client)
        self._lock: IO[str] | None = None  # daemon.lock held shared while the profile is open
        self._pump: concurrent.futures.Future[None] | None = None
        self._base, self._cap = backoff_base, backoff_cap
        self._random = random.SystemRandom().random

    # ---- opening --------------------------------------------------------------------------------

    @classmethod
    async def unlock(
        cls,
        profile: Path,
        passphrase: str,
        *,
        transport_factory: TransportFactory = WebSocketTransport,
        **options: float,
    ) -> ClientBackend:
        lock = hold_shared(profile)
        if lock is None:
            raise LocalProtocolError(
                f"a kluis daemon (pid {holder(profile)}) holds {profile}: the app attaches to it"
            )
        thread = ClientThread()

        async def open_() -> KluisClient:
            return KluisClient.open(profile, passphrase, transport_factory=transport_factory)

        try:
            client = await thread.call(open_)
        except BaseException:
            thread.stop()
            lock.close()
            raise
        backend = cls(thread, client, **options)
        backend._lock = lock
        return backend

    @classmethod
    async def register(
        cls,
        server: str,
        licence: str,
        profile: Path,
        passphrase: str,
        *,
        transport_factory: TransportFactory = WebSocketTransport,
        kdf: KdfParams | None = None,
        **options: float,
    ) -> ClientBackend:
        thread = ClientThread()

        async def register_() -> KluisClient:
            return await KluisClient.register(
                server, licence, profile, passphrase, transport_factory=transport_factory, kdf=kdf
            )

        try:
            client = await thread.call(register_)
        except BaseException:
            thread.stop()
            raise
        backend = cls(thread, client, **options)
        backend._lock = hold_shared(profile)  # new: no daemon can hold it yet
        return backend

    # ---- the Backend protocol -------------------------------------------------------------------

    @property
    def account_id(self) -> str:
        return self._client.account_id

    async def _run(self, make: Callable[[], Awaitable[T]]) -> T:
        async def wrapped() -> T:
            return await make()

        return await self._thread.call(wrapped)

    async def history(self, conversation: str | None = None) -> list[Message]:
        return await self._run(lambda: self._ops.history(conversation))

    async def groups(self) -> list[GroupState]:
        return await self._run(self._ops.groups)

    async def quarantined(self) -> int:
        return await self._run(self._ops.quarantined)

    async def send(self, conversation: str, text: str, reply_to: bytes = b"") -> Message:
        return await self._run(lambda: self._ops.send(conversation, text, reply_to))

    async def create_group(self, name: str, members: list[str]) -> GroupState:
        return await self._run(lambda: self._ops.create_group(name, members))

    async def change_group(
        self, group: str, action: GroupAction, accounts: list[str], name: str | None
    ) -> GroupState:
        return await self._run(lambda: self._ops.change_group(group, action, accounts, name))

    async def verification_status(self, peer: str) -> tuple[Status, str]:
        return await self._run(lambda: self._ops.verification_status(peer))

    async def start_verification(self, peer: str) -> Verification:
        return await self._run(lambda: self._ops.start_verification(peer))

    async def confirm_verification(self, txn: bytes, match: bool) -> None:
        await self._run(lambda: self._ops.confirm_verification(txn, match))

    async def cancel_verification(self, txn: bytes) -> None:
        await self._run(lambda: self._ops.cancel_verification(txn))

    async def contacts(self) -> dict[str, str]:
        return await self._run(self._ops.contacts)

    async def set_contact(self, account: str, name: str) -> None:
        await self._run(lambda: self._ops.set_contact(account, name))

    async def timers(self) -> dict[str, int]:
        return await self._run(self._ops.timers)

    async def set_timer(self, conversation: str, seconds: int) -> Message:
        return await self._run(lambda: self._ops.set_timer(conversation, seconds))

    async def mark_read(self, conversation: str) -> None:
        await self._run(lambda: self._ops.mark_read(conversation))

    async def renewal_notice(self) -> str:
        return await self._run(self._ops.renewal_notice)

    async def outbox_refused(self) -> list[tuple[str, str]]:
        return await self._run(self._ops.outbox_refused)

    async def send_file(
        self, conversation: str, path: Path, caption: str, progress: Progress
    ) -> Message:
        return await self._run(lambda: self._ops.send_file(conversation, path, caption, progress))

    async def save_file(self, ref: AttachmentRef, folder: Path, progress: Progress) -> Path:
        return await self._run(lambda: self._ops.save_file(ref, folder, progress))

    async def attachment_bytes(self, ref: AttachmentRef, limit: int) -> bytes:
        return await self._run(lambda: self._ops.attachment_bytes(ref, limit))

    def start(self, post: Post) -> None:
        if self._pump is None:
            self._pump = asyncio.run_coroutine_threadsafe(self._follow(post), self._thread.loop)

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()

        async def close_() -> None:
            await self._client.close()

        try:
            await self._thread.call(close_)
        finally:
            self._thread.stop()
            if self._lock is not None:
                self._lock.close()  # closed: a daemon may take the profile now
                self._lock = None

    # ---- the pump (runs on the client thread) ---------------------------------------------------

    async def _follow(self, post: Post) -> None:
        """Follow ``events()`` for ever; when it ends, wait (back-off, jitter) and go again:
        ``client/backoff.py``, equal jitter, reset after a stable connection, and at once when
        the node said it is going away (1001: it drains; the next login lands elsewhere)."""
        policy = BackoffPolicy(base_s=self._base, cap_s=self._cap, jitter="equal")
        backoff = Backoff(policy, clock=time.monotonic, random=self._random)
        await follow(self._client, backoff, post)  # any failure: say why, and try again later
