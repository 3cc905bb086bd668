"""A fake :class:`kluis.apps.tui.backend.Backend` with fixed contents, and fixed time, so that
snapshots and screenshots of the app are the same on every run."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from textual.app import App
from textual.worker import WorkerCancelled

from kluis.apps.tui.app import KluisApp
from kluis.apps.tui.backend import BackendEvent, GroupAction, Online, Post, Progress
from kluis.apps.tui.graphics import Mode
from kluis.client.events import MessageReceived
from kluis.client.groups import GroupState
from kluis.client.records import Message
from kluis.client.timers import describe
from kluis.client.verification import State, Status, Verification
from kluis.errors import BlobTooLarge
from kluis.protocol.attachment import AttachmentRef

ME = "mea7kzq2vt5xbn3d"
ANNA = "annak3v7q2xw5zpe"
BRAM = "bram4t6yq2nd7kfa"
GROUP = "g" + "q3fz7kd2m5xv4w6nt2hb7cae"
NOW = datetime(2025, 3, 14, 16, 30, tzinfo=UTC)
CHUNK = 1024  # the fake's transfers report progress per KiB
NASTY = "ok\rannak3v7q2xw5zpe: fake\x1b[2J\x07 \u202eevil\u202c\nsecond line"


def at(days: int, hour: int, minute: int) -> datetime:
    return (NOW - timedelta(days=days)).replace(hour=hour, minute=minute)


def sample_history() -> list[Message]:
    return [
        Message(ANNA, ANNA, at(1, 9, 12), "Morning! Did the new keys arrive?"),
        Message(
            ME,
            ANNA,
            at(1, 9, 14),
            "Yes: safety numbers match.\nCalling you later.",
            id=b"r" * 16,
            receipt="read",
        ),
        Message(ANNA, ANNA, at(0, 8, 2), "Great, see you at 5."),
        Message(BRAM, GROUP, at(0, 10, 40), "Agenda for Friday is in the shared file."),
        Message(ME, GROUP, at(0, 10, 41), "Thanks Bram", id=b"d" * 16, receipt="delivered"),
        Message(BRAM, BRAM, at(2, 18, 5), "Are you coming to the meeting?"),
    ]


DEMO_NICKNAMES = {ANNA: "Anna"}  # the screenshots show a nickname and a timer
DEMO_TIMERS = {ANNA: 7 * 86_400}


class FakeBackend:
    def __init__(
        self,
        messages: list[Message] | None = None,
        quarantined: int = 0,
        *,
        nicknames: dict[str, str] | None = None,
        timers: dict[str, int] | None = None,
        renewal: str = "",
        me: str = ME,
    ) -> None:
        self.me = me
        self.messages = list(sample_history() if messages is None else messages)
        self.nicknames = dict(nicknames or {})
        self._timers = dict(timers or {})
        self.renewal = renewal
        self.read: list[str] = []  # conversations marked read, in order
        self.history_reads = 0
        self.refused: list[tuple[str, str]] = []  # the outbox's refusals, until taken
        self.changes: list[tuple[str, list[str], str | None]] = []  # group changes asked
        self.blobs: dict[str, bytes] = {}  # "uploaded" files, by blob ID
        self.hold = asyncio.Event()  # file transfers wait for it (set: they run through)
        self.hold.set()
        self.previews_fetched: list[str] = []  # blob IDs fetched for a preview
        self._groups = [
            GroupState(GROUP, "Book club", sorted([ME, ANNA, BRAM]), 1, b"x" * 16),
        ]
        self._quarantined = quarantined
        self.post: Post | None = None
        self.sent: list[tuple[str, str]] = []
        self.replies: list[bytes] = []  # the reply_to of each send, in order
        self.verifications: list[tuple[str, str]] = []  # (act, peer or txn hex), in order
        self.closed = False
        self.statuses: dict[str, tuple[Status, str]] = {}
        self.refuse: Exception | None = None  # raised by send, when set

    @property
    def account_id(self) -> str:
        return self.me

    async def history(self, conversation: str | None = None) -> list[Message]:
        self.history_reads += 1
        return [m for m in self.messages if conversation in (None, m.conversation)]

    async def groups(self) -> list[GroupState]:
        return list(self._groups)

    async def quarantined(self) -> int:
        return self._quarantined

    async def send(self, conversation: str, text: str, reply_to: bytes = b"") -> Message:
        if self.refuse is not None:
            raise self.refuse
        self.sent.append((conversation, text))
        self.replies.append(reply_to)
        sent_id = f"sent{len(self.sent)}".encode().ljust(16, b".")
        message = Message(ME, conversation, NOW, text, id=sent_id, reply_to=reply_to)
        self.messages.append(message)
        return message

    async def create_group(self, name: str, members: list[str]) -> GroupState:
        group = GroupState("g" + "a" * 24, name, sorted([ME, *members]), 1, b"y" * 16)
        self._groups.append(group)
        return group

    async def change_group(
        self, group: str, action: GroupAction, accounts: list[str], name: str | None
    ) -> GroupState:
        if self.refuse is not None:
            raise self.refuse
        old = next(g for g in self._groups if g.id == group)
        members = set(old.members)
        if action == "add":
            members |= set(accounts)
        elif action == "remove":
            members -= set(accounts)
        elif action == "leave":
            members.discard(ME)
        new = GroupState(group, name or old.name, sorted(members), old.version + 1, b"z" * 16)
        new.member = action != "leave"
        self._groups[self._groups.index(old)] = new
        self.changes.append((action, list(accounts), name))
        return new

    async def verification_status(self, peer: str) -> tuple[Status, str]:
        return self.statuses.get(peer, (Status.UNVERIFIED, ""))

    async def start_verification(self, peer: str) -> Verification:
        self.verifications.append(("start", peer))
        return Verification(b"t" * 16, peer, "", State.REQUESTED)

    async def confirm_verification(self, txn: bytes, match: bool) -> None:
        self.verifications.append(("confirm" if match else "mismatch", txn.hex()))

    async def cancel_verification(self, txn: bytes) -> None:
        self.verifications.append(("cancel", txn.hex()))

    async def contacts(self) -> dict[str, str]:
        return dict(self.nicknames)

    async def set_contact(self, account: str, name: str) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.nicknames[account] = name

    async def timers(self) -> dict[str, int]:
        return {c: s for c, s in self._timers.items() if s}

    async def set_timer(self, conversation: str, seconds: int) -> Message:
        if self.refuse is not None:
            raise self.refuse
        self._timers[conversation] = seconds
        line = f"disappearing messages: {describe(seconds)}"
        message = Message(ME, conversation, NOW, line, kind="timer")
        self.messages.append(message)
        return message

    async def outbox_refused(self) -> list[tuple[str, str]]:
        refused, self.refused = self.refused, []
        return refused

    async def mark_read(self, conversation: str) -> None:
        self.read.append(conversation)

    async def renewal_notice(self) -> str:
        return self.renewal

    async def send_file(
        self, conversation: str, path: Path, caption: str, progress: Progress
    ) -> Message:
        data = path.read_bytes()
        for done in range(0, len(data), CHUNK):
            progress(done, len(data))
            await self.hold.wait()  # tests see the bar while this waits
        progress(len(data), len(data))
        ref = AttachmentRef(
            id=f"{len(self.blobs):032x}",
            key=b"k" * 32,
            digest=b"d" * 32,
            size=len(data),
            name=path.name,
        )
        self.blobs[ref.id] = data
        message = Message(ME, conversation, NOW, caption, attachment=ref)
        self.messages.append(message)
        return message

    async def save_file(self, ref: AttachmentRef, folder: Path, progress: Progress) -> Path:
        data = self.blobs[ref.id]
        progress(0, len(data))
        await self.hold.wait()
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / (ref.name or "file")
        target.write_bytes(data)
        progress(len(data), len(data))
        return target

    async def attachment_bytes(self, ref: AttachmentRef, limit: int) -> bytes:
        self.previews_fetched.append(ref.id)
        await self.hold.wait()
        data = self.blobs[ref.id]
        if len(data) > limit:
            raise BlobTooLarge(f"{len(data)} bytes")
        return data

    def start(self, post: Post) -> None:
        self.post = post
        post(Online())

    def emit(self, event: BackendEvent) -> None:
        """Hand ``event`` to the app; a message is in the history first, as with a client."""
        assert self.post is not None
        if isinstance(event, MessageReceived):
            self.messages.append(event.message)
        self.post(event)

    async def close(self) -> None:
        self.closed = True


def fake_app(
    tmp: Path,
    backend: FakeBackend | None = None,
    *,
    theme: str = "textual-dark",
    images: Mode = Mode.HALFBLOCK,
) -> KluisApp:
    return KluisApp(
        tmp / "profile",
        backend=backend or FakeBackend(),
        clock=lambda: NOW,
        tz=UTC,
        cursor_blink=False,
        theme=theme,
        images=images,
    )


async def wait_workers(app: App[Any]) -> None:
    """Wait until the app's workers are done. An exclusive worker replaced by a newer one (the
    chat's loader when another conversation opens) ends cancelled, as it should: then wait for
    what runs now (``wait_for_complete`` raises WorkerCancelled for it)."""
    for _ in range(20):
        try:
            await app.workers.wait_for_complete()
            return
        except WorkerCancelled:
            await asyncio.sleep(0)
    await app.workers.wait_for_complete()
