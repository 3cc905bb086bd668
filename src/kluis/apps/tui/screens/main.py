"""The main screen: conversation list, chat view, compose box, status line.

Theory of operation: the screen keeps a :class:`~kluis.apps.tui.model.ConversationBook` (pure)
and draws it; everything that touches the client (history, sending, nicknames, timers, read
marks) runs in a Textual worker that awaits the backend's thread, so the UI never waits on
cryptography, the profile or the network. Events of the client arrive as
:class:`BackendMessage` and change the book, then the widgets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message as TextualMessage
from textual.screen import Screen
from textual.widgets import Footer, OptionList, Static

from kluis.apps.tui.backend import BackendEvent, GroupAction, Offline, Online
from kluis.apps.tui.model import (
    OPERATOR_TITLE,
    UNREADABLE,
    ConversationBook,
    KeyWarning,
    Notice,
    is_person,
)
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
from kluis.apps.tui.widgets import ChatLog, ComposeArea, ConversationList, StatusLine
from kluis.client.events import (
    ContactChanged,
    DeviceAlarm,
    MessageReceived,
    MessagesExpired,
    ReceiptReceived,
    Undecryptable,
)
from kluis.client.groups import is_group_id
from kluis.client.operator import OPERATOR
from kluis.client.records import Message
from kluis.client.timers import describe
from kluis.client.verification import Status
from kluis.errors import KluisError, NotSent, UntrustedDevice, VerificationBroken
from kluis.protocol.attachment import AttachmentRef

if TYPE_CHECKING:
    from kluis.apps.tui.app import KluisApp


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
    ]

    def __init__(self) -> None:
        super().__init__()
        self.book = ConversationBook(self.app.backend_required.account_id)
        self.online: bool | None = None
        self.status_detail = ""
        self.alarmed = False
        self.expiry_notice = ""  # the subscription's end, once near: stays in the status line
        self._receipts_due = False  # a redraw for new receipt marks is scheduled
        self._jump_to: object = None  # a message to bring into view once the chat is drawn
        # conversations whose last send was refused for a key change, until acknowledged:
        # the compose box takes no input for them meanwhile
        self.key_warnings: dict[str, KeyWarning] = {}

    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            with Vertical(id="sidebar"):
                yield Static(Text("Conversations", style="bold"), classes="heading")
                yield ConversationList(id="conversations")
            with Vertical(id="chat"):
                yield Static(id="chat-title", classes="heading")
                yield ChatLog(id="log")
                yield TransferBar(id="transfer")
                yield ComposeArea(id="compose", placeholder="Write a message · Enter sends")
        yield StatusLine(id="status")
        yield Footer()

    def on_mount(self) -> None:
        compose = self.query_one(ComposeArea)
        compose.cursor_blink = self.app.cursor_blink
        compose.focus()
        self._show_status()
        self._load()

    # ---- loading and events ---------------------------------------------------------------------

    @work(exclusive=True, group="load")
    async def _load(self) -> None:
        backend = self.app.backend_required
        history = await backend.history()
        groups = await backend.groups()
        quarantined = await backend.quarantined()
        self.book.load(history, groups, await backend.contacts(), await backend.timers())
        self.expiry_notice = await backend.renewal_notice()
        if self.expiry_notice:
            self.book.notice(Notice(self.app.now(), "operator", self.expiry_notice))
            self.app.notify(self.expiry_notice, title="Subscription", severity="warning")
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
                if self.book.open_id is not None:
                    self._fill_chat()  # what the outbox sent on reconnection shows now
                self._outbox_refused()
            case Offline(reason=reason, retry_in=delay):
                self.online = False
                self.status_detail = f"{reason} · reconnecting in {delay:.1f}s"
                self._show_status()
            case MessageReceived(message=m):
                self.book.add(m)
                if is_group_id(m.conversation):
                    self._reload_groups()
                if m.kind == "timer":
                    self._reload_timers()
                if m.conversation == self.book.open_id:
                    self._show_message(m)
                    if m.conversation != OPERATOR:
                        self._mark_read(m.conversation)
                if m.sender == OPERATOR:
                    self.app.notify(
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
                self.app.notify(
                    safe_line(notice.text).plain, title="Unreadable message", severity="warning"
                )
                self._refresh_list()
            case DeviceAlarm(alarm=alarm):
                self.alarmed = True
                self.book.notice(Notice(self.app.now(), "alarm", alarm))
                self._show_status()
                self.app.bell()
                self.app.push_screen(AlarmScreen(alarm))

    @work(group="verification")
    async def _check_verification(self, peers: list[str]) -> None:
        """Fetch the verification state of ``peers`` (on the client thread) for the marks."""
        changed = False
        for peer in peers:
            try:
                status, _ = await self.app.backend_required.verification_status(peer)
            except KluisError:
                continue
            changed |= self.book.set_verification(peer, _MARKS[status])
        if changed:
            self._refresh_list()
            self._refresh_title()

    def _redraw_receipts(self) -> None:
        self._receipts_due = False
        self._fill_chat()

    @work(group="timers")
    async def _reload_timers(self) -> None:
        timers = await self.app.backend_required.timers()
        changed = False
        for row in self.book.rows():
            changed |= self.book.set_timer(row.id, timers.get(row.id, 0))
        if changed:
            self._refresh_list()
            self._refresh_title()

    @work(group="outbox")
    async def _outbox_refused(self) -> None:
        """Messages of the outbox the server refused on reconnection: dropped, and said."""
        for conversation, why in await self.app.backend_required.outbox_refused():
            text = f"not sent, dropped from the outbox: to {self.book.title(conversation)}: {why}"
            notice = Notice(self.app.now(), "alarm", text, conversation)
            self.book.notice(notice)
            if conversation == self.book.open_id:
                self.query_one(ChatLog).add_notice(notice, self.app.now(), self.app.tz)
            self.app.notify(safe_line(text).plain, title="Not sent", severity="error")

    @work(group="read")
    async def _mark_read(self, conversation: str) -> None:
        """Read receipts for what the user now sees (the client sends them when connected)."""
        with contextlib.suppress(KluisError):  # a courtesy: it must not disturb the chat
            await self.app.backend_required.mark_read(conversation)

    @work(group="groups")
    async def _reload_groups(self) -> None:
        for group in await self.app.backend_required.groups():
            self.book.update_group(group)
        self._refresh_list()
        self._refresh_title()

    # ---- showing --------------------------------------------------------------------------------

    def _show_status(self) -> None:
        self.query_one(StatusLine).set_state(
            self.online, self.book.me, self.status_detail, self.alarmed, self.expiry_notice
        )

    def _show_message(self, m: Message) -> None:
        self.query_one(ChatLog).add_message(
            m, self.book.me, self.app.now(), self.app.tz, self.book.name(m.sender)
        )

    def _refresh_list(self) -> None:
        self.query_one(ConversationList).show(self.book.rows(), self.book.open_id)

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
        messages = await self.app.backend_required.history(conversation)
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
            self.app.notify("open a conversation first (Ctrl+N)", severity="warning")
            return
        if conversation in self.key_warnings:
            self._warn(self.key_warnings[conversation])
            return
        self.query_one(ComposeArea).clear()
        self._send(conversation, event.text)

    @work(group="send")
    async def _send(self, conversation: str, text: str) -> None:
        try:
            sent = await self.app.backend_required.send(conversation, text)
        except NotSent:
            # The client kept it, encrypted, in the outbox and sends it on reconnection:
            # giving the text back would send it twice.
            self.app.notify(
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
                self.app.notify(safe_line(str(exc)).plain, title="Not sent", severity="error")
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
                status, reason = await self.app.backend_required.verification_status(account)
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
        self.app.notify(f"creating group with {len(members)} member(s)…")
        try:
            group = await self.app.backend_required.create_group(name, members)
        except KluisError as exc:
            self.app.notify(safe_line(str(exc)).plain, title="No group", severity="error")
            return
        self.book.update_group(group)
        self.open_conversation(group.id)
        self.query_one(ComposeArea).focus()

    def action_members(self) -> None:
        row = self.book.get(self.book.open_id or "")
        if row is None or not row.is_group:
            self.app.notify("the open conversation is not a group", severity="warning")
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
            state = await self.app.backend_required.change_group(group, action, accounts, name)
        except KluisError as exc:
            self.app.notify(safe_line(str(exc)).plain, title="Group not changed", severity="error")
            return
        self.book.update_group(state)
        self._refresh_list()
        if group == self.book.open_id:
            self._refresh_chat()  # the change's line, and the title
        if action == "leave":
            self.app.notify(safe_line(f"you left {state.name}").plain, title="Group")

    def action_nickname(self) -> None:
        """Name the open conversation's peer (F3); an empty name goes back to the ID."""
        conversation = self.book.open_id or ""
        if not is_person(conversation):
            self.app.notify("open a conversation with a person to name them", severity="warning")
            return

        def named(name: object) -> None:
            if isinstance(name, str):
                self._set_nickname(conversation, name)

        current = self.book.nicknames.get(conversation, "")
        self.app.push_screen(NicknameScreen(conversation, current), named)

    @work(group="contacts")
    async def _set_nickname(self, account: str, name: str) -> None:
        try:
            await self.app.backend_required.set_contact(account, name)
        except KluisError as exc:
            self.app.notify(safe_line(str(exc)).plain, title="Not named", severity="error")
            return
        self.book.set_nickname(account, name)
        self._refresh_list()
        self._refresh_chat()

    def action_timer(self) -> None:
        """Set the open conversation's disappearing-message timer (F4)."""
        conversation = self.book.open_id or ""
        row = self.book.get(conversation)
        if row is None or conversation in (UNREADABLE, OPERATOR):
            self.app.notify("open a conversation first", severity="warning")
            return

        def chosen(seconds: object) -> None:
            if isinstance(seconds, int):
                self._set_timer(conversation, seconds)

        self.app.push_screen(TimerScreen(row.title, row.timer), chosen)

    @work(group="timers")
    async def _set_timer(self, conversation: str, seconds: int) -> None:
        try:
            line = await self.app.backend_required.set_timer(conversation, seconds)
        except KluisError as exc:
            self.app.notify(safe_line(str(exc)).plain, title="Timer not set", severity="error")
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
            self.app.notify("open a conversation first", severity="warning")
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
            sent = await self.app.backend_required.send_file(
                conversation, path, caption, self._progress(f"↑ {path.name}")
            )
        except (KluisError, OSError) as exc:
            self.app.notify(safe_line(str(exc)).plain, title="File not sent", severity="error")
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
        messages = await self.app.backend_required.history(conversation)

        def chosen(result: object) -> None:
            if isinstance(result, tuple):
                ref, folder = result
                self._save_file(ref, folder)

        self.app.push_screen(SaveScreen(messages), chosen)

    @work(group="files")
    async def _save_file(self, ref: AttachmentRef, folder: Path) -> None:
        try:
            path = await self.app.backend_required.save_file(
                ref, folder, self._progress(f"↓ {ref.name or 'file'}")
            )
        except (KluisError, OSError) as exc:
            self.app.notify(safe_line(str(exc)).plain, title="Not saved", severity="error")
            return
        finally:
            self.post_message(TransferProgress("", 0, 0, finished=True))
        self.app.notify(safe_line(f"saved {path}").plain, title="File saved")

    def action_search(self) -> None:
        """Search the local history (Ctrl+F): conversations and messages."""
        from kluis.apps.tui.search import open_search

        open_search(self.app)

    def action_show_id(self) -> None:
        from kluis.apps.tui.screens.onboarding import IdScreen

        self.app.push_screen(IdScreen(self.book.me))
