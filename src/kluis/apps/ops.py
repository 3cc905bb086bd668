"""What the app does with a client, written once: :class:`ClientOps` and the events it hears.

Theory of operation: the app's :class:`~kluis.apps.tui.backend.Backend` operations are async
methods of :class:`ClientOps` on one :class:`KluisClient`, run on the loop the client lives on:
``ClientBackend`` runs them on its client thread (the app alone), the daemon on its own loop
for an app attached to it (``apps/app_rpc.py``). Their type hints are also the wire schema of
the daemon's ``app.*`` methods (:data:`OPERATIONS`), so an operation is written in one place.
:func:`backend_event` picks from ``client.events()`` what the app shows, and :func:`follow`
follows that stream for ever, with back-off, for the app alone and for the daemon alike.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from kluis.client.backoff import GOING_AWAY, Backoff
from kluis.client.events import (
    ConnectionDown,
    ConnectionUp,
    ContactChanged,
    DeviceAlarm,
    Event,
    MessageReceived,
    MessagesExpired,
    ReceiptReceived,
    Undecryptable,
    VerificationChanged,
    VerificationRequested,
)
from kluis.client.groups import GroupState
from kluis.client.records import Message
from kluis.client.verification import Status, Verification
from kluis.errors import LocalProtocolError, NotSent, TransportError
from kluis.protocol.attachment import AttachmentRef

if TYPE_CHECKING:
    from kluis.client.client import KluisClient


@dataclass(frozen=True, slots=True)
class Online:
    """Logged in (again)."""


@dataclass(frozen=True, slots=True)
class Offline:
    """The connection is down; the next attempt comes in ``retry_in`` seconds."""

    reason: str
    retry_in: float


BackendEvent = (
    Online
    | Offline
    | MessageReceived
    | Undecryptable
    | DeviceAlarm
    | ReceiptReceived
    | ContactChanged
    | MessagesExpired
    | VerificationRequested
    | VerificationChanged
)
EVENT_KINDS: tuple[type[BackendEvent], ...] = (
    Online,
    Offline,
    MessageReceived,
    Undecryptable,
    DeviceAlarm,
    ReceiptReceived,
    ContactChanged,
    MessagesExpired,
    VerificationRequested,
    VerificationChanged,
)
Post = Callable[[BackendEvent], None]
GroupAction = Literal["add", "remove", "rename", "leave"]
Progress = Callable[[int, int], None]  # (bytes done, bytes in all)

# The operations an attached app may call (``app.<name>`` on the daemon's socket).
OPERATIONS = (
    "history",
    "groups",
    "quarantined",
    "send",
    "create_group",
    "change_group",
    "verification_status",
    "start_verification",
    "confirm_verification",
    "cancel_verification",
    "contacts",
    "set_contact",
    "timers",
    "set_timer",
    "mark_read",
    "renewal_notice",
    "outbox_refused",
    "send_file",
    "save_file",
    "attachment_bytes",
)
MAX_ATTACHMENT_BYTES = 16 * 1024 * 1024  # attachment_bytes answers at most this much


def backend_event(event: Event) -> BackendEvent | None:
    """``event`` if the app shows it (connection changes aside: the follower says those)."""
    return event if isinstance(event, EVENT_KINDS) else None


async def follow(
    client: KluisClient,
    backoff: Backoff,
    post: Post,
    *,
    retry_on: tuple[type[Exception], ...] = (Exception,),
    failed: Callable[[Exception], None] | None = None,
) -> None:
    """Follow ``client.events()`` for ever, handing ``post`` what the app shows: Online at each
    login, the events of :func:`backend_event`, and Offline (why, and the wait) when the stream
    ends; then wait and go again (``client/backoff.py``: reset after a stable connection, and
    no wait when the node said it is going away, 1001: it drains, the next login lands
    elsewhere). An exception of ``retry_on`` (a refused login, DNS, ...) ends a round as a lost
    connection does, ``failed`` hearing it first; any other ends the follow."""
    while True:
        reason = "not connected"
        going_away = False
        try:
            async for event in client.events():
                if isinstance(event, ConnectionUp):
                    backoff.up()
                    post(Online())
                elif isinstance(event, ConnectionDown):
                    reason = event.reason
                    going_away = event.close_code == GOING_AWAY
                elif (shown := backend_event(event)) is not None:
                    post(shown)  # notes: the app does not show them
        except retry_on as exc:
            if failed is not None:
                failed(exc)
            reason = str(exc) or type(exc).__name__
        delay = backoff.down(going_away=going_away)
        post(Offline(reason, delay))
        await asyncio.sleep(delay)


class ClientOps:
    """The app's operations on ``client``; await them on the client's loop only."""

    def __init__(self, client: KluisClient) -> None:
        self.client = client

    async def history(self, conversation: str | None = None) -> list[Message]:
        return self.client.history(conversation)

    async def groups(self) -> list[GroupState]:
        return self.client.groups()

    async def quarantined(self) -> int:
        return self.client.quarantined

    async def send(self, conversation: str, text: str, reply_to: bytes = b"") -> Message:
        if not self.client.connected:
            # offline: into the outbox, encrypted; the next connect() sends it
            self.client.keep(conversation, text, reply_to=reply_to)
            raise NotSent("kept in the outbox: offline")
        try:
            return await self.client.send(conversation, text, reply_to=reply_to)
        except LocalProtocolError as exc:
            if "not connected" in str(exc):  # the connection went in the meantime
                raise LocalProtocolError("offline: the message was not sent") from exc
            raise

    async def create_group(self, name: str, members: list[str]) -> GroupState:
        return await self.client.create_group(name, members)

    async def change_group(
        self, group: str, action: GroupAction, accounts: list[str], name: str | None
    ) -> GroupState:
        return await self.client.change_group(group, action, accounts, name)

    async def verification_status(self, peer: str) -> tuple[Status, str]:
        return self.client.verification_status(peer)

    async def start_verification(self, peer: str) -> Verification:
        return await self.client.start_verification(peer)

    async def confirm_verification(self, txn: bytes, match: bool) -> None:
        await self.client.confirm_verification(txn, match)

    async def cancel_verification(self, txn: bytes) -> None:
        await self.client.cancel_verification(txn)

    async def contacts(self) -> dict[str, str]:
        return self.client.contacts()

    async def set_contact(self, account: str, name: str) -> None:
        await self.client.set_contact(account, name)

    async def timers(self) -> dict[str, int]:
        return self.client.timers()

    async def set_timer(self, conversation: str, seconds: int) -> Message:
        return await self.client.set_timer(conversation, seconds)

    async def mark_read(self, conversation: str) -> None:
        # offline: the receipts wait in the profile for the next connection
        with contextlib.suppress(TransportError):
            await self.client.mark_read(conversation)

    async def renewal_notice(self) -> str:
        return self.client.renewal_notice()

    async def outbox_refused(self) -> list[tuple[str, str]]:
        refused = [(p.conversation, str(e)) for p, e in self.client.outbox_errors]
        self.client.outbox_errors.clear()
        return refused

    async def send_file(
        self, conversation: str, path: Path, caption: str, progress: Progress
    ) -> Message:
        return await self.client.send_file(conversation, path, caption, progress)

    async def save_file(self, ref: AttachmentRef, folder: Path, progress: Progress) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        return await self.client.download_attachment(ref, folder, progress)

    async def attachment_bytes(self, ref: AttachmentRef, limit: int) -> bytes:
        if not 0 <= limit <= MAX_ATTACHMENT_BYTES:
            raise LocalProtocolError(f"a preview is at most {MAX_ATTACHMENT_BYTES} bytes")
        return await self.client.attachment_bytes(ref, limit)
