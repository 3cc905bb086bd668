"""The main screen: conversation list, chat view, compose box, status line.

Theory of operation: the screen keeps a :class:`~kluis.apps.tui.model.ConversationBook` (pure)
and draws it; everything that touches the client (history, sending, nicknames, timers, read
marks) runs in a Textual worker that awaits the backend's thread, so the UI never waits on
cryptography, the profile or the network. Events of the client arrive as
:class:`BackendMessage` and change the book, then the widgets.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import RenderableType
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.message import Message as TextualMessage
from textual.notifications import SeverityLevel
from textual.screen import Screen
from textual.widgets import Footer, OptionList, Static

from kluis.apps.tui.backend import Backend, BackendEvent, GroupAction, Offline, Online
from kluis.apps.tui.graphics import ENV, Mode
from kluis.apps.tui.images import MAX_IMAGE_BYTES, Preview, is_image, render_preview
from kluis.apps.tui.model import (
    OPERATOR_TITLE,
    UNREADABLE,
    ConversationBook,
    KeyWarning,
    Notice,
    is_person,
)
from kluis.apps.tui.remote import DaemonBackend
from kluis.apps.tui.safe_text import safe_line
from kluis.apps.tui.screens.contact import NicknameScreen, TimerScreen
from kluis.apps.tui.screens.dialogs import (
    AlarmScreen,
    KeyChangeScreen,
    MembersScreen,
    NewConversationScreen,
    NewGroupScreen,
)
from kluis.apps.tui.screens.files import AttachScreen, SaveScreen, TransferBar, TransferProgress
from kluis.apps.tui.screens.verify import VerifyScreen
from kluis.apps.tui.widgets import (
    ChatLog,
    ComposeArea,
    ConversationList,
    StatusLine,
    message_key,
    quote_line,
)
from kluis.client.events import (
    ContactChanged,
    DeviceAlarm,
    MessageReceived,
    MessagesExpired,
    ReceiptReceived,
    Undecryptable,
    VerificationChanged,
    VerificationRequested,
)
from kluis.client.groups import is_group_id
from kluis.client.operator import OPERATOR
from kluis.client.records import Message
from kluis.client.timers import describe
from kluis.client.verification import State, Status, Verification
from kluis.errors import KluisError, NotSent, UntrustedDevice, VerificationBroken
from kluis.protocol.attachment import AttachmentRef

if TYPE_CHECKING:
    from kluis.apps.tui.app import KluisApp


LOADING = "loading"
RECEIPT_REDRAW_S = 0.25  # receipts arriving within this are drawn together
_MARKS = {Status.VERIFIED: "verified", Status.BROKEN: "broken", Status.UNVERIFIED: ""}


class BackendMessage(TextualMessage):
    """An event of the client thread, delivered on the app's loop."""

    def __init__(self, event: BackendEvent) -> None:
        super().__init__()
        self.event = event


class MainScreen(Screen[None]):
    app: KluisApp

    # priority: these keys work even while the compose box (a TextArea, with keys of its own
    # such as Ctrl+Y and F6) has the focus; keys.py refuses keys that would type text
    BINDINGS = [
        Binding("ctrl+n", "new_conversation", "New chat", id="new_conversation", priority=True),
        Binding("ctrl+g", "new_group", "New group", id="new_group", priority=True),
        Binding("ctrl+f", "search", "Search", id="search", priority=True),
        Binding("f2", "members", "Members", id="members", priority=True, show=False),
        Binding("f3", "nickname", "Name", id="nickname", priority=True),
        Binding("f4", "timer", "Timer", id="timer", priority=True),
        Binding("ctrl+o", "attach", "File", id="attach", priority=True),
        Binding("ctrl+s", "save_file", "Save", id="save_file", priority=True, show=False),
        Binding("ctrl+y", "show_id", "My ID", id="show_id", priority=True, show=False),
        Binding("f5", "show_images", "Images", id="show_images", priority=True, show=False),
        Binding(
            "ctrl+up", "select_previous", "Select", id="select_previous", priority=True, show=False
        ),
        Binding("ctrl+down", "select_next", "Select", id="select_next", priority=True, show=False),
        Binding("f6", "reply", "Reply", id="reply", priority=True, show=False),
        Binding("escape", "cancel_reply", "Cancel reply", show=False),
        Binding("f7", "verify", "Verify", id="verify", priority=True, show=False),
    ]

    def __init__(self, backend: Backend | None = None, profile: Path | None = None) -> None:
        super().__init__()
        self.backend = backend or self.app.backend_required
        self.profile = profile or self.app.profile
        self.book = ConversationBook(self.backend.account_id)
        self.online: bool | None = None
        self.status_detail = ""
        self.alarmed = False
        self.expiry_notice = ""  # the subscription's end, once near: stays in the status line
        self._receipts_due = False  # a redraw for new receipt marks is scheduled
        # IDs of the others' messages the book has counted: a message is counted once, whether
        # it comes as an event or is found in the history after a reattach (see _catch_up)
        self._known: set[bytes] = set()
        self._was_offline = False
        self._jump_to: object = None  # a message to bring into view once the chat is drawn
        # conversations whose last send was refused for a key change, until acknowledged:
        # the compose box takes no input for them meanwhile
        self.key_warnings: dict[str, KeyWarning] = {}
        # image previews by blob ID: drawn, refused (why), or on their way (LOADING)
        self.previews: dict[str, Preview | str] = {}
        self.images_opened: set[str] = set()  # conversations whose images the user asked for
        # while another profile is shown: what this one would have said, said when shown again
        self._toasts: list[tuple[str, str, SeverityLevel]] = []
        self._alarms: list[str] = []
        # replies: the message chosen in the chat view (Ctrl+Up/Down), and the one the next
        # send quotes (F6); both belong to the open conversation and go when it changes
        self.selected: Message | None = None
        self.reply_to: Message | None = None
        # the SAS verification shown (F7): its dialog, and the flow's transaction once known
        self.verify_screen: VerifyScreen | None = None
        self.verify_txn = b""

    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            with Vertical(id="sidebar"):
                yield Static(Text("Conversations", style="bold"), id="profiles", classes="heading")
                yield ConversationList(id="conversations")
            with Vertical(id="chat"):
                yield Static(id="chat-title", classes="heading")
                yield ChatLog(id="log")
                yield TransferBar(id="transfer")
                yield Static(id="reply-bar")
                yield ComposeArea(id="compose", placeholder="Write a message · Enter sends")
        yield StatusLine(id="status")
        yield Footer()

    def on_mount(self) -> None:
        compose = self.query_one(ComposeArea)
        compose.cursor_blink = self.app.cursor_blink
        compose.focus()
        self.show_profiles()
        self._show_status()
        self._load()

    # ---- profiles -------------------------------------------------------------------------------

    @property
    def in_view(self) -> bool:
        """This screen's profile is the one shown (several may be open: see ``KluisApp``)."""
        return self.app.profile == self.profile

    def _notify(
        self, message: str, *, title: str = "", severity: SeverityLevel = "information"
    ) -> None:
        """A toast of this profile: kept until it is shown when another profile is."""
        if self.in_view:
            self.app.notify(message, title=title, severity=severity)
        else:
            self._toasts.append((message, title, severity))

    def on_screen_resume(self) -> None:
        if not self.is_mounted or not self.in_view:
            return
        toasts, self._toasts = self._toasts, []
        for message, title, severity in toasts:
            self.app.notify(message, title=title, severity=severity)
        alarms, self._alarms = self._alarms, []
        for alarm in alarms:
            self.app.push_screen(AlarmScreen(alarm))
        conversation = self.book.open_id
        row = self.book.get(conversation) if conversation else None
        if conversation is not None and row is not None and row.unread:
            self.open_conversation(conversation)  # what came meanwhile is read now

    def show_profiles(self) -> None:
        """The heading: every open profile, this one marked, the others' unread counts."""
        tabs = self.app.profile_tabs()
        try:
            heading = self.query_one("#profiles", Static)
        except NoMatches:  # installed, not composed yet: on_mount draws it
            return
        if len(tabs) < 2:
            heading.update(Text("Conversations", style="bold"))
            return
        text = Text(no_wrap=True, overflow="ellipsis")
        for index, tab in enumerate(tabs):
            if index:
                text.append(" │ ", style="dim")
            mine = tab.current
            style = "bold reverse" if mine else ("dim italic" if tab.locked else "bold")
            text.append_text(safe_line(tab.name[:10], style))
            if tab.unread and not mine:
                text.append(f" ({tab.unread})", style="bold yellow")
        text.append("  F8", style="dim")
        heading.update(text)

    # ---- loading and events ---------------------------------------------------------------------

    @work(exclusive=True, group="load")
    async def _load(self) -> None:
        backend = self.backend
        history = await backend.history()
        groups = await backend.groups()
        quarantined = await backend.quarantined()
        self.book.load(history, groups, await backend.contacts(), await backend.timers())
        self._known.update(m.id for m in history if m.sender != self.book.me and m.id)
        self.expiry_notice = await backend.renewal_notice()
        if self.expiry_notice:
            self.book.notice(Notice(self.app.now(), "operator", self.expiry_notice))
            self._notify(self.expiry_notice, title="Subscription", severity="warning")
            self._show_status()
        if quarantined:
            self.book.notice(
                Notice(
                    self.app.now(),
                    "unreadable",
                    f"{quarantined} earlier message(s) could not be read; kept encrypted "
                    "in the profile",
                )
            )
        rows = [row for row in self.book.rows() if row.id != UNREADABLE]
        if rows and self.book.open_id is None:
            self.open_conversation(rows[0].id)
        else:
            self._refresh_list()
            self._refresh_chat()
        backend.start(self._post_event)
        self._check_verification([row.id for row in rows if is_person(row.id)])

    @work(exclusive=True, group="catch-up")
    async def _catch_up(self) -> None:
        """Attached again to a daemon (it was away, or started again): what it received
        meanwhile came as no event here, so the others' messages the book has not counted
        are taken from the history, counted as unread where not in view."""
        new = [m for m in await self.backend.history() if not self._counted(m)]
        for m in new:
            self.book.add(m, seen=self.in_view)
        if new:
            self._refresh_list()
            if any(m.conversation == self.book.open_id for m in new):
                self._fill_chat()

    def _counted(self, m: Message) -> bool:
        """Whether the book counted ``m`` already (else it is noted as counted now); our own
        messages, and lines without an ID, are never looked up."""
        if m.sender == self.book.me or not m.id:
            return False
        if m.id in self._known:
            return True
        self._known.add(m.id)
        return False

    def _post_event(self, event: BackendEvent) -> None:
        """Called on the client thread: post_message is thread-safe."""
        self.post_message(BackendMessage(event))

    @on(BackendMessage)
    def _event(self, message: BackendMessage) -> None:
        event = message.event
        match event:
            case Online():
                self.online, self.status_detail = True, ""
                self._show_status()
                if self._was_offline and isinstance(self.backend, DaemonBackend):
                    self._catch_up()
                self._was_offline = False
                if self.book.open_id is not None:
                    self._fill_chat()  # what the outbox sent on reconnection shows now
                self._outbox_refused()
            case Offline(reason=reason, retry_in=delay):
                self.online = False
                self._was_offline = True
                self.status_detail = f"{reason} · reconnecting in {delay:.1f}s"
                self._show_status()
            case MessageReceived(message=m) if self._counted(m):
                pass  # found by _catch_up first
            case MessageReceived(message=m):
                self.book.add(m, seen=self.in_view)
                if is_group_id(m.conversation):
                    self._reload_groups()
                if m.kind == "timer":
                    self._reload_timers()
                if m.conversation == self.book.open_id:
                    self._show_message(m)
                    if m.conversation != OPERATOR and self.in_view:
                        self._mark_read(m.conversation)
                if m.sender == OPERATOR:
                    self._notify(
                        safe_line(m.text).plain, title=OPERATOR_TITLE, severity="information"
                    )
                self._refresh_list()
            case ReceiptReceived(conversation=conversation, status=status, ids=ids):
                if conversation != self.book.open_id or self._receipts_due:
                    pass
                elif not self.query_one(ChatLog).mark_receipt(ids, status):
                    # the marks cannot be drawn in place: draw the chat again, once for the
                    # receipts of a short while (each reads the conversation's history)
                    self._receipts_due = True
                    self.set_timer(RECEIPT_REDRAW_S, self._redraw_receipts)
            case ContactChanged(account=account, name=name):
                self.book.set_nickname(account, name)
                self._refresh_list()
                self._refresh_chat()
            case MessagesExpired():
                self.previews.clear()  # no picture outlives its message; the rest reload
                self._refresh_chat()
            case Undecryptable(code=code, reason=reason, sender=sender, device=device):
                text = f"unreadable message ({code}): {reason}"
                if sender:
                    text += f"; claims to be from {self.book.title(sender)}"
                    text += f" ({sender}), device {device[:12]}" if device else f" ({sender})"
                notice = Notice(self.app.now(), "unreadable", text)
                self.book.notice(notice)
                if self.book.open_id == UNREADABLE:
                    self.query_one(ChatLog).add_notice(notice, self.app.now(), self.app.tz)
                self._notify(
                    safe_line(notice.text).plain, title="Unreadable message", severity="warning"
                )
                self._refresh_list()
            case VerificationRequested(peer=peer):
                who = self.book.title(peer)
                text = f"{who} asks to verify: press F7 in your chat with them"
                self._chat_notice(Notice(self.app.now(), "info", text, peer))
                self.app.notify(safe_line(text).plain, title="Verification")
            case VerificationChanged(verification=flow):
                self._verification_changed(flow)
            case DeviceAlarm(alarm=alarm):
                self.alarmed = True
                self.book.notice(Notice(self.app.now(), "alarm", alarm))
                self._show_status()
                self.app.bell()
                if self.in_view:
                    self.app.push_screen(AlarmScreen(alarm))
                else:
                    self._alarms.append(alarm)  # shown when this profile is

    @work(group="verification")
    async def _check_verification(self, peers: list[str]) -> None:
        """Fetch the verification state of ``peers`` (on the client thread) for the marks."""
        changed = False
        for peer in peers:
            try:
                status, _ = await self.backend.verification_status(peer)
            except KluisError:
                continue
            changed |= self.book.set_verification(peer, _MARKS[status])
        if changed:
            self._refresh_list()
            self._refresh_chat()  # the title's mark, and previews a verified sender allows

    def _redraw_receipts(self) -> None:
        self._receipts_due = False
        self._fill_chat()

    @work(group="timers")
    async def _reload_timers(self) -> None:
        timers = await self.backend.timers()
        changed = False
        for row in self.book.rows():
            changed |= self.book.set_timer(row.id, timers.get(row.id, 0))
        if changed:
            self._refresh_list()
            self._refresh_title()

    @work(group="outbox")
    async def _outbox_refused(self) -> None:
        """Messages of the outbox the server refused on reconnection: dropped, and said."""
        for conversation, why in await self.backend.outbox_refused():
            text = f"not sent, dropped from the outbox: to {self.book.title(conversation)}: {why}"
            notice = Notice(self.app.now(), "alarm", text, conversation)
            self.book.notice(notice)
            if conversation == self.book.open_id:
                self.query_one(ChatLog).add_notice(notice, self.app.now(), self.app.tz)
            self._notify(safe_line(text).plain, title="Not sent", severity="error")

    @work(group="read")
    async def _mark_read(self, conversation: str) -> None:
        """Read receipts for what the user now sees (the client sends them when connected)."""
        with contextlib.suppress(KluisError):  # a courtesy: it must not disturb the chat
            await self.backend.mark_read(conversation)

    @work(group="groups")
    async def _reload_groups(self) -> None:
        for group in await self.backend.groups():
            self.book.update_group(group)
        self._refresh_list()
        self._refresh_title()

    # ---- showing --------------------------------------------------------------------------------

    def _show_status(self) -> None:
        via = self.backend.via if isinstance(self.backend, DaemonBackend) else ""
        self.query_one(StatusLine).set_state(
            self.online, self.book.me, self.status_detail, self.alarmed, self.expiry_notice, via
        )

    def _show_message(self, m: Message) -> None:
        log = self.query_one(ChatLog)
        quote = log.message(m.reply_to)
        quote_name = self._sender_label(quote.sender) if quote is not None else ""
        log.add_message(
            m, self.book.me, self.app.now(), self.app.tz, self.book.name(m.sender), quote_name
        )
        if m.attachment is not None and is_image(m.attachment):
            log.add_preview(self._preview(m, m.attachment))

    def _may_preview(self, m: Message) -> bool:
        """Images of ours, of verified contacts, or of a conversation the user opened them in
        (F5): a stranger's file is not fetched, nor decoded, unless asked for."""
        if m.sender == self.book.me or m.conversation in self.images_opened:
            return True
        row = self.book.get(m.sender)
        return row is not None and row.verification == "verified"

    def _preview(self, m: Message, ref: AttachmentRef) -> RenderableType:
        state = self.previews.get(ref.id)
        if state is None and self.app.images is Mode.OFF:
            return Text(f"image: previews are off ({ENV}=off)", "dim")
        if state is None:
            if not self._may_preview(m):
                return Text("image: unverified sender · F5 shows it", "dim")
            self.previews[ref.id] = state = LOADING
            self._load_preview(ref, m.conversation)
        if isinstance(state, Preview):
            return state.renderable
        if state == LOADING:
            return Text("loading the preview…", style="dim italic")
        return safe_line(f"image not shown: {state}", "bold red")

    @work(group="previews")
    async def _load_preview(self, ref: AttachmentRef, conversation: str) -> None:
        """Fetch the image (the client's thread) and decode it (a thread of its own)."""
        try:
            data = await self.backend.attachment_bytes(ref, MAX_IMAGE_BYTES)
            mode = self.app.images
            self.previews[ref.id] = await asyncio.to_thread(render_preview, data, mode=mode)
        except KluisError as exc:
            self.previews[ref.id] = f"{exc.message} ({exc.code})"
        if conversation == self.book.open_id:
            self._fill_chat()

    def action_show_images(self) -> None:
        """Preview the images of the open conversation, whoever sent them (F5); previews that
        failed (offline, say) are tried again."""
        conversation = self.book.open_id
        if conversation is None:
            return
        self.images_opened.add(conversation)
        for blob, state in list(self.previews.items()):
            if isinstance(state, str) and state != LOADING:
                del self.previews[blob]
        self._fill_chat()

    def _sender_label(self, account: str) -> str:
        return "you" if account == self.book.me else self.book.name(account) or account[:8]

    def _refresh_list(self) -> None:
        self.query_one(ConversationList).show(self.book.rows(), self.book.open_id)
        self.app.profiles_changed()

    def _refresh_title(self) -> None:
        title = self.query_one("#chat-title", Static)
        conversation = self.book.open_id
        row = self.book.get(conversation) if conversation else None
        if row is None:
            title.update(Text("No conversation: Ctrl+N to start one", style="dim"))
            return
        text = Text("# " if row.is_group else "", style="bold cyan")
        text.append_text(safe_line(row.title, "bold magenta" if row.id == OPERATOR else "bold"))
        if row.is_group:
            text.append(f"  {len(row.members)} members · F2", style="dim")
        elif is_person(row.id) and row.title != row.id:
            text.append(f"  {row.id}", style="dim")  # a nickname: the real ID next to it
        if row.verification == "verified":
            text.append("  ✓ verified", style="bold green")
        elif row.verification == "broken":
            text.append("  ⚠ keys changed: verify again", style="bold red")
        if row.timer:
            text.append(f"  ◷ {describe(row.timer)}", style="yellow")
        title.update(text)

    def _refresh_chat(self) -> None:
        self._refresh_title()
        self._fill_chat()

    @work(exclusive=True, group="chat")
    async def _fill_chat(self) -> None:
        log = self.query_one(ChatLog)
        conversation = self.book.open_id
        if conversation is None:
            log.reset()
            return
        if conversation == UNREADABLE:
            log.reset()
            for notice in self.book.notices:
                if notice.kind == "unreadable":
                    log.add_notice(notice, self.app.now(), self.app.tz)
            return
        messages = await self.backend.history(conversation)
        if conversation != self.book.open_id:
            return
        log.reset()
        if conversation == OPERATOR:
            for notice in self.book.notices:
                if notice.kind == "operator":
                    log.add_notice(notice, self.app.now(), self.app.tz)
        jump, self._jump_to = self._jump_to, None
        log.auto_scroll = jump is None  # a jump: no write may scroll to the end meanwhile
        notices = [n for n in self.book.notices if n.conversation == conversation]
        entries: list[Message | Notice] = [*messages, *notices]
        for entry in sorted(entries, key=lambda e: e.time):  # stable: history order kept
            if isinstance(entry, Notice):
                log.add_notice(entry, self.app.now(), self.app.tz)
            else:
                self._show_message(entry)
        if jump is not None:
            self.call_after_refresh(log.scroll_to_message, jump)

    def open_conversation(self, conversation: str) -> None:
        self.selected = self.reply_to = None
        self._show_reply_bar()
        self.book.open(conversation)
        self._refresh_list()
        self._refresh_chat()
        self._guard_compose()
        if is_person(conversation):
            self._check_verification([conversation])
        if conversation not in (UNREADABLE, OPERATOR):
            self._mark_read(conversation)

    def show_message(self, conversation: str, key: object) -> None:
        """Open ``conversation`` at the message with ``key`` (a search hit)."""
        self._jump_to = key
        if conversation == self.book.open_id:
            self._fill_chat()
        else:
            self.open_conversation(conversation)

    def _guard_compose(self) -> None:
        """No input in the compose box while the open conversation has an unacknowledged
        key-change warning."""
        compose = self.query_one(ComposeArea)
        compose.read_only = (self.book.open_id or "") in self.key_warnings

    @on(OptionList.OptionSelected, "#conversations")
    def _selected(self, event: OptionList.OptionSelected) -> None:
        if event.option.id and event.option.id != self.book.open_id:
            self.open_conversation(event.option.id)
        self.query_one(ComposeArea).focus()

    # ---- sending --------------------------------------------------------------------------------

    @on(ComposeArea.Submitted)
    def _on_compose_submitted(self, event: ComposeArea.Submitted) -> None:
        conversation = self.book.open_id
        if conversation is None or conversation == UNREADABLE:
            self._notify("open a conversation first (Ctrl+N)", severity="warning")
            return
        if conversation in self.key_warnings:
            self._warn(self.key_warnings[conversation])
            return
        self.query_one(ComposeArea).clear()
        reply_to = self.reply_to.id if self.reply_to is not None else b""
        self.selected = self.reply_to = None
        self._show_reply_bar()
        self._send(conversation, event.text, reply_to)

    @work(group="send")
    async def _send(self, conversation: str, text: str, reply_to: bytes = b"") -> None:
        try:
            sent = await self.backend.send(conversation, text, reply_to)
        except NotSent:
            # The client kept it, encrypted, in the outbox and sends it on reconnection:
            # giving the text back would send it twice.
            self._notify(
                "kept in the outbox: it goes when the connection is back",
                title="Not sent yet",
                severity="warning",
            )
            return
        except KluisError as exc:
            compose = self.query_one(ComposeArea)
            if not compose.text:
                compose.text = text  # give the text back, to send again
            elif compose.text != text:
                compose.text = text + "\n" + compose.text  # typed meanwhile: keep both
            if isinstance(exc, VerificationBroken | UntrustedDevice):
                await self._key_changed(conversation, exc)
            else:
                self._notify(safe_line(str(exc)).plain, title="Not sent", severity="error")
            return
        self.book.add(sent)
        if conversation == self.book.open_id:
            self.query_one(ChatLog).auto_scroll = True  # what we send shows at the end
            self._show_message(sent)
        self._refresh_list()

    async def _key_changed(
        self, conversation: str, exc: VerificationBroken | UntrustedDevice
    ) -> None:
        """A send refused for a key change: block the compose box for ``conversation`` and
        show the warning until it is acknowledged."""
        account = str(exc.details.get("account") or conversation)
        kind = "broken" if isinstance(exc, VerificationBroken) else "untrusted"
        detail = exc.message
        if kind == "broken":
            try:
                status, reason = await self.backend.verification_status(account)
            except KluisError:
                status, reason = Status.BROKEN, ""
            detail = reason or detail
            if self.book.set_verification(account, _MARKS[status]):
                self._refresh_list()
                self._refresh_title()
        warning = KeyWarning(conversation, account, kind, detail)
        self.key_warnings[conversation] = warning
        notice = Notice(
            self.app.now(), "alarm", f"not sent: key change for {account}: {detail}", conversation
        )
        self.book.notice(notice)
        if conversation == self.book.open_id:
            self.query_one(ChatLog).add_notice(notice, self.app.now(), self.app.tz)
        self._guard_compose()
        self.app.bell()
        self._warn(warning)

    def _warn(self, warning: KeyWarning) -> None:
        if isinstance(self.app.screen, KeyChangeScreen):
            return

        def acknowledged(_: object) -> None:
            self.key_warnings.pop(warning.conversation, None)
            self._guard_compose()
            self.query_one(ComposeArea).focus()

        contact = self.book.title(warning.account)
        self.app.push_screen(KeyChangeScreen(warning, contact), acknowledged)

    # ---- actions --------------------------------------------------------------------------------

    def _show_reply_bar(self) -> None:
        """Above the compose box: the message chosen, or the one the next send quotes (drawn
        as chosen in the chat view too)."""
        bar = self.query_one("#reply-bar", Static)
        chosen = self.reply_to or self.selected
        self.query_one(ChatLog).mark(message_key(chosen) if chosen is not None else None)
        if chosen is None:
            bar.display = False
            return
        line = quote_line(chosen, self._sender_label(chosen.sender), "italic")
        head = "Replying to " if self.reply_to is not None else "F6 replies to "
        text = Text(head, style="bold")
        text.append_text(line)
        text.append("  · Esc cancels", style="dim")
        text.no_wrap, text.overflow = True, "ellipsis"  # one line, whatever the quote
        bar.update(text)
        bar.display = True

    def _select(self, step: int) -> None:
        """Move the choice ``step`` messages back (-1) or on (+1) from the chosen one (from the
        newest when none); past the newest: nothing chosen."""
        log = self.query_one(ChatLog)
        quotable = log.quotable()
        if not quotable:
            self.app.notify("no message to reply to here", severity="warning")
            return
        ids = [m.id for m in quotable]
        current = self.selected or self.reply_to
        index = ids.index(current.id) if current is not None and current.id in ids else None
        if index is None:
            index = len(quotable) - 1 if step < 0 else None
        else:
            index += step
        self.reply_to = None
        if index is None or index >= len(quotable):
            self.selected = None
            self._show_reply_bar()
        else:
            self.selected = quotable[max(0, index)]
            self._show_reply_bar()
            log.scroll_to_message(message_key(self.selected))

    def action_select_previous(self) -> None:
        self._select(-1)

    def action_select_next(self) -> None:
        self._select(+1)

    def action_reply(self) -> None:
        """Quote the chosen message (the newest when none is chosen) in the next send."""
        if self.book.open_id in (None, UNREADABLE, OPERATOR):
            self.app.notify("open a conversation first (Ctrl+N)", severity="warning")
            return
        target = self.selected
        if target is None:
            quotable = self.query_one(ChatLog).quotable()
            target = quotable[-1] if quotable else None
        if target is None:
            self.app.notify("no message to reply to here", severity="warning")
            return
        self.reply_to, self.selected = target, None
        self._show_reply_bar()
        self.query_one(ComposeArea).focus()

    # ---- SAS verification (F7) -------------------------------------------------------------------

    def _chat_notice(self, notice: Notice) -> None:
        self.book.notice(notice)
        if notice.conversation == self.book.open_id:
            self.query_one(ChatLog).add_notice(notice, self.app.now(), self.app.tz)

    def action_verify(self) -> None:
        """Verify the open chat's peer side by side: ask, or answer the peer's request."""
        peer = self.book.open_id
        if peer is None or not is_person(peer):
            self.app.notify("open a chat with a person first", severity="warning")
            return
        if self.verify_screen is not None:
            return

        def closed(result: object) -> None:
            self.verify_screen = None
            if result in ("differ", "cancel") and self.verify_txn:
                self._answer_verification(self.verify_txn, result)

        self.verify_txn = b""
        self.verify_screen = VerifyScreen(peer, self.book.title(peer), self._confirmed)
        self.app.push_screen(self.verify_screen, closed)
        self._start_verification(peer)

    @work(group="verification")
    async def _start_verification(self, peer: str) -> None:
        try:
            flow = await self.app.backend_required.start_verification(peer)
        except KluisError as exc:
            self._end_verification(f"verification not started: {exc}", "alarm", peer)
            return
        if not self.verify_txn:  # an event may have told it first
            self.verify_txn = flow.txn
        if self.verify_screen is not None and flow.state is State.REQUESTED:
            who = self.book.title(peer)
            self.verify_screen.state(f"Asked {who}: waiting for them to press F7 in their chat…")

    def _confirmed(self, match: bool) -> None:
        if self.verify_txn:
            self._answer_verification(self.verify_txn, "match" if match else "differ")

    @work(group="verification")
    async def _answer_verification(self, txn: bytes, answer: object) -> None:
        backend = self.app.backend_required
        try:
            if answer == "cancel":
                await backend.cancel_verification(txn)
            else:
                await backend.confirm_verification(txn, answer == "match")
        except KluisError as exc:
            self.app.notify(safe_line(str(exc)).plain, title="Verification", severity="error")

    def _verification_changed(self, flow: Verification) -> None:
        screen = self.verify_screen
        mine = screen is not None and screen.peer == flow.peer
        if mine and flow.state not in (State.VERIFIED, State.CANCELLED):
            self.verify_txn = flow.txn  # the flow under way (ours, or the peer's we answered)
        if flow.state is State.COMPARING and flow.short_code is not None:
            if mine and screen is not None and screen.code is None:
                screen.show_code(flow.short_code)
        elif flow.state is State.VERIFIED:
            who = self.book.title(flow.peer)
            self._end_verification(f"verified {who}: the codes matched", "info", flow.peer)
            self._check_verification([flow.peer])
        elif flow.state is State.CANCELLED:
            text = f"verification with {self.book.title(flow.peer)} failed: {flow.reason}"
            self._end_verification(text, "alarm", flow.peer)
            self._check_verification([flow.peer])

    def _end_verification(self, text: str, kind: str, peer: str) -> None:
        if self.verify_screen is not None and self.verify_screen.peer == peer:
            screen, self.verify_screen = self.verify_screen, None
            self.verify_txn = b""
            if screen.is_attached:
                screen.dismiss(None)
        self._chat_notice(Notice(self.app.now(), kind, text, peer))
        severity: SeverityLevel = "information" if kind == "info" else "warning"
        self.app.notify(safe_line(text).plain, title="Verification", severity=severity)

    def action_cancel_reply(self) -> None:
        self.selected = self.reply_to = None
        self._show_reply_bar()

    def action_new_conversation(self) -> None:
        def opened(result: object) -> None:
            if isinstance(result, tuple):
                peer, nickname = result
                if nickname:
                    self._set_nickname(peer, nickname)
                self.open_conversation(peer)
                self.query_one(ComposeArea).focus()

        self.app.push_screen(NewConversationScreen(self.book.me), opened)

    def action_new_group(self) -> None:
        def made(result: object) -> None:
            if isinstance(result, tuple):
                name, members = result
                self._create_group(name, members)

        self.app.push_screen(NewGroupScreen(self.book.me), made)

    @work(group="groups")
    async def _create_group(self, name: str, members: list[str]) -> None:
        self._notify(f"creating group with {len(members)} member(s)…")
        try:
            group = await self.backend.create_group(name, members)
        except KluisError as exc:
            self._notify(safe_line(str(exc)).plain, title="No group", severity="error")
            return
        self.book.update_group(group)
        self.open_conversation(group.id)
        self.query_one(ComposeArea).focus()

    def action_members(self) -> None:
        row = self.book.get(self.book.open_id or "")
        if row is None or not row.is_group:
            self._notify("the open conversation is not a group", severity="warning")
            return

        def chosen(result: object) -> None:
            if isinstance(result, tuple):
                action, accounts, name = result
                self._change_group(row.id, action, accounts, name)

        self.app.push_screen(MembersScreen(row, self.book.me, self.book.nicknames), chosen)

    @work(group="groups")
    async def _change_group(
        self, group: str, action: GroupAction, accounts: list[str], name: str | None
    ) -> None:
        try:
            state = await self.backend.change_group(group, action, accounts, name)
        except KluisError as exc:
            self._notify(safe_line(str(exc)).plain, title="Group not changed", severity="error")
            return
        self.book.update_group(state)
        self._refresh_list()
        if group == self.book.open_id:
            self._refresh_chat()  # the change's line, and the title
        if action == "leave":
            self._notify(safe_line(f"you left {state.name}").plain, title="Group")

    def action_nickname(self) -> None:
        """Name the open conversation's peer (F3); an empty name goes back to the ID."""
        conversation = self.book.open_id or ""
        if not is_person(conversation):
            self._notify("open a conversation with a person to name them", severity="warning")
            return

        def named(name: object) -> None:
            if isinstance(name, str):
                self._set_nickname(conversation, name)

        current = self.book.nicknames.get(conversation, "")
        self.app.push_screen(NicknameScreen(conversation, current), named)

    @work(group="contacts")
    async def _set_nickname(self, account: str, name: str) -> None:
        try:
            await self.backend.set_contact(account, name)
        except KluisError as exc:
            self._notify(safe_line(str(exc)).plain, title="Not named", severity="error")
            return
        self.book.set_nickname(account, name)
        self._refresh_list()
        self._refresh_chat()

    def action_timer(self) -> None:
        """Set the open conversation's disappearing-message timer (F4)."""
        conversation = self.book.open_id or ""
        row = self.book.get(conversation)
        if row is None or conversation in (UNREADABLE, OPERATOR):
            self._notify("open a conversation first", severity="warning")
            return

        def chosen(seconds: object) -> None:
            if isinstance(seconds, int):
                self._set_timer(conversation, seconds)

        self.app.push_screen(TimerScreen(row.title, row.timer), chosen)

    @work(group="timers")
    async def _set_timer(self, conversation: str, seconds: int) -> None:
        try:
            line = await self.backend.set_timer(conversation, seconds)
        except KluisError as exc:
            self._notify(safe_line(str(exc)).plain, title="Timer not set", severity="error")
            return
        self.book.set_timer(conversation, seconds)
        self.book.add(line)
        if conversation == self.book.open_id:
            self._show_message(line)
        self._refresh_list()
        self._refresh_title()

    # ---- files ----------------------------------------------------------------------------------

    def _chat_with_someone(self) -> str | None:
        conversation = self.book.open_id
        if conversation is None or conversation in (UNREADABLE, OPERATOR):
            self._notify("open a conversation first", severity="warning")
            return None
        return conversation

    def _progress(self, label: str) -> Callable[[int, int], None]:
        """A progress callback for the client's thread: it only posts messages."""

        def report(done: int, total: int) -> None:
            self.post_message(TransferProgress(label, done, total))

        return report

    @on(TransferProgress)
    def _transfer(self, message: TransferProgress) -> None:
        self.query_one(TransferBar).show(message)

    def action_attach(self) -> None:
        """Send a file to the open conversation (Ctrl+O)."""
        conversation = self._chat_with_someone()
        if conversation is None:
            return

        def chosen(result: object) -> None:
            if isinstance(result, tuple):
                path, caption = result
                self._send_file(conversation, path, caption)

        self.app.push_screen(AttachScreen(self.book.title(conversation)), chosen)

    @work(group="files")
    async def _send_file(self, conversation: str, path: Path, caption: str) -> None:
        try:
            sent = await self.backend.send_file(
                conversation, path, caption, self._progress(f"↑ {path.name}")
            )
        except (KluisError, OSError) as exc:
            self._notify(safe_line(str(exc)).plain, title="File not sent", severity="error")
            return
        finally:
            self.post_message(TransferProgress("", 0, 0, finished=True))
        self.book.add(sent)
        if conversation == self.book.open_id:
            self.query_one(ChatLog).auto_scroll = True  # what we send shows at the end
            self._show_message(sent)
        self._refresh_list()

    def action_save_file(self) -> None:
        """Save a file of the open conversation (Ctrl+S)."""
        conversation = self._chat_with_someone()
        if conversation is not None:
            self._pick_file(conversation)

    @work(group="files")
    async def _pick_file(self, conversation: str) -> None:
        messages = await self.backend.history(conversation)

        def chosen(result: object) -> None:
            if isinstance(result, tuple):
                ref, folder = result
                self._save_file(ref, folder)

        self.app.push_screen(SaveScreen(messages), chosen)

    @work(group="files")
    async def _save_file(self, ref: AttachmentRef, folder: Path) -> None:
        try:
            path = await self.backend.save_file(
                ref, folder, self._progress(f"↓ {ref.name or 'file'}")
            )
        except (KluisError, OSError) as exc:
            self._notify(safe_line(str(exc)).plain, title="Not saved", severity="error")
            return
        finally:
            self.post_message(TransferProgress("", 0, 0, finished=True))
        self._notify(safe_line(f"saved {path}").plain, title="File saved")

    def action_search(self) -> None:
        """Search the local history (Ctrl+F): conversations and messages."""
        from kluis.apps.tui.search import open_search

        open_search(self.app)

    def action_show_id(self) -> None:
        from kluis.apps.tui.screens.onboarding import IdScreen

        self.app.push_screen(IdScreen(self.book.me))
