"""Widgets of the chat screens; every peer-supplied string goes through :mod:`.safe_text`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import datetime, tzinfo

import segno
from rich.console import RenderableType
from rich.padding import Padding
from rich.styled import Styled
from rich.table import Table
from rich.text import Text
from textual import events
from textual.geometry import Size
from textual.message import Message as TextualMessage
from textual.widgets import OptionList, RichLog, Static, TextArea
from textual.widgets.option_list import Option

from kluis.apps.tui.model import UNREADABLE, Conversation, Notice, human_size, short_timer
from kluis.apps.tui.safe_text import safe_line, safe_text
from kluis.client.operator import OPERATOR
from kluis.client.records import Message


def short_id(account: str) -> str:
    return account[:8]


def local(when: datetime, tz: tzinfo | None) -> datetime:
    return when.astimezone(tz)


def day_label(day: datetime, today: datetime) -> str:
    if day.date() == today.date():
        return "Today"
    if (today.date() - day.date()).days == 1:
        return "Yesterday"
    return day.strftime("%a %d %b %Y")


# ---- the chat view ------------------------------------------------------------------------------


def _row(time: str, who: Text, body: Text) -> Table:
    """Time, sender and text in fixed columns: a line break or a wrap in the text stays in
    the text's column, so no text can draw what looks like another message's header."""
    grid = Table.grid(expand=True)
    grid.add_column(width=6, no_wrap=True, style="dim")
    grid.add_column(width=10, no_wrap=True, overflow="crop")
    grid.add_column(ratio=1, overflow="fold")
    grid.add_row(time, who, body)
    return grid


RECEIPT_MARKS = {
    "delivered": Text(" ✓", style="dim"),
    "read": Text(" ✓✓", style="bold cyan"),
}
OPERATOR_STYLE = "bold magenta"
SELECTED_STYLE = "on #3a3a5a"  # the message chosen to reply to


QUOTE_CHARS = 60  # of the quoted message, in a reply's first line
MISSING_QUOTE = "a message you do not have"


def quote_line(quote: Message | None, name: str, style: str = "dim italic") -> Text:
    """``↪ NAME: first words`` of a quoted message (sanitised, one line), or that this device
    does not hold it (expired, never received, or of another conversation)."""
    line = Text("↪ ", style="dim")
    if quote is None:
        line.append(MISSING_QUOTE, style=style)
        return line
    text = quote.text or (f"[file] {quote.attachment.name}" if quote.attachment else "")
    cut = text[:QUOTE_CHARS] + ("…" if len(text) > QUOTE_CHARS else "")
    line.append_text(safe_line(f"{name}: ", f"bold {style}"))
    line.append_text(safe_line(cut, style))
    return line


_RANK = {"": 0, "delivered": 1, "read": 2}  # receipt states only go up


def message_renderable(
    message: Message,
    me: str,
    tz: tzinfo | None,
    name: str | None = None,
    quote: Message | None = None,
    quote_name: str = "",
) -> RenderableType:
    """One message in its row: ``name`` is how the sender is shown (a nickname; else the start
    of the ID). Our own messages carry their receipt (✓ delivered, ✓✓ read); a timer change
    is a system line; an operator announcement is a notice, not a person's message. A reply
    starts with the quoted message (``quote``, by ``quote_name``; None: we do not have it)."""
    when = local(message.time, tz).strftime("%H:%M")
    mine = message.sender == me
    if message.sender == OPERATOR:
        return _row(
            when, Text("operator", style=OPERATOR_STYLE), safe_text(message.text, "magenta")
        )
    label = "you" if mine else (name or short_id(message.sender))
    who = safe_line(label, "bold green" if mine else "bold")
    if mine and message.receipt in RECEIPT_MARKS:
        who.truncate(10 - len(RECEIPT_MARKS[message.receipt].plain))
        who.append_text(RECEIPT_MARKS[message.receipt])
    if message.kind == "timer":
        return _row(when, who, safe_text(message.text, "italic dim"))
    body = safe_text(message.text)
    if message.attachment is not None:
        ref = message.attachment
        label_text = Text("[file] ", style="bold")
        label_text.append_text(safe_line(ref.name or "(no name)"))
        label_text.append(f" ({human_size(ref.size)})")
        body = label_text if not message.text else label_text + Text("\n") + body
    if message.reply_to:
        body = quote_line(quote, quote_name) + Text("\n") + body
    return _row(when, who, body)


def notice_renderable(notice: Notice, tz: tzinfo | None) -> RenderableType:
    when = local(notice.time, tz).strftime("%H:%M")
    if notice.kind == "operator":
        style = OPERATOR_STYLE
    elif notice.kind in ("unreadable", "alarm"):
        style = "bold red"
    else:
        style = "italic"
    mark = Text("!" if notice.kind != "info" else "·", style=style)
    return _row(when, mark, safe_text(notice.text, style))


def message_key(message: Message) -> object:
    """What tells a message from the others of its conversation: its ID, else its sender and
    time (messages stored before IDs existed)."""
    return message.id or (message.sender, message.time)


def separator(label: str) -> Text:
    return Text(f"── {label} ──", style="dim", justify="center")


# How a message was drawn: the message, me, the time zone, the sender's name, the message it
# quotes and the quoted sender's name.
_Drawn = tuple[Message, str, tzinfo | None, str | None, Message | None, str]


class ChatLog(RichLog):
    """The open conversation: messages with time and sender, and day separators."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(
            id=id, markup=False, highlight=False, wrap=True, auto_scroll=True, min_width=20
        )
        self.can_focus = True
        self._last_day: str | None = None
        self._entries: list[RenderableType] = []
        self._starts: list[int] = []  # the first line of each entry, as last written
        self._keys: dict[object, int] = {}  # message_key -> entry index
        # entry index -> the message and how it was drawn (me, tz, name, its quote and the
        # quoted sender's name): receipts redraw it in place
        self._messages: dict[int, _Drawn] = {}
        self._width = 0
        # What a reply may quote and a quote is drawn from: the messages shown, in order,
        # and by ID (this conversation's only: the log shows one conversation).
        self.messages: list[Message] = []
        self._by_id: dict[bytes, Message] = {}
        self._marked: int | None = None  # the entry drawn as chosen (replies)

    def reset(self) -> None:
        self.clear()
        self._entries.clear()
        self._starts.clear()
        self._keys.clear()
        self.messages.clear()
        self._by_id.clear()
        self._marked = None
        self._messages.clear()
        self._last_day = None

    def message(self, id_: bytes) -> Message | None:
        """The message ``id_`` of the conversation shown; None if it is not shown."""
        return self._by_id.get(id_) if id_ else None

    def quotable(self) -> list[Message]:
        """The messages a reply may quote: the users' texts and files, with an ID."""
        return [m for m in self.messages if m.id and m.kind == "text"]

    def _emit(self, renderable: RenderableType) -> None:
        self._entries.append(renderable)
        self._starts.append(len(self.lines))
        self.write(renderable, expand=True)

    def on_resize(self, event: events.Resize) -> None:
        """Lines are wrapped when written: write them again at the new width."""
        if event.size.width != self._width:
            self._width = event.size.width
            self._rewrite()

    def _rewrite(self) -> None:
        self.clear()
        for index, renderable in enumerate(self._entries):
            self._starts[index] = len(self.lines)
            if index == self._marked:
                renderable = Styled(renderable, SELECTED_STYLE)
            self.write(renderable, expand=True)

    def mark(self, key: object) -> None:
        """Draw the message with ``key`` (see :func:`message_key`) as chosen; None: none. The
        view stays where it was."""
        index = self._keys.get(key) if key is not None else None
        if index != self._marked:
            self._marked = index
            scroll_y, follow = self.scroll_y, self.auto_scroll
            self.auto_scroll = False
            self._rewrite()
            self.auto_scroll = follow
            if not follow:
                self.scroll_to(y=scroll_y, animate=False)

    def scroll_to_message(self, key: object) -> bool:
        """Bring the message with ``key`` (see :func:`message_key`) to the top; False if it is
        not shown."""
        index = self._keys.get(key)
        if index is None:
            return False
        self.auto_scroll = False  # until the chat is drawn again or the user sends
        self.scroll_to(y=self._starts[index], animate=False)
        return True

    def _day(self, when: datetime, today: datetime) -> None:
        label = day_label(when, today)
        key = when.date().isoformat()
        if key != self._last_day:
            self._last_day = key
            self._emit(separator(label))

    def add_message(
        self,
        message: Message,
        me: str,
        today: datetime,
        tz: tzinfo | None,
        name: str | None = None,
        quote_name: str = "",
    ) -> None:
        """Draw ``message``; a reply quotes the message it names from this log (the
        conversation's history), whose sender shows as ``quote_name``."""
        self._day(local(message.time, tz), today)
        self._keys[message_key(message)] = len(self._entries)
        quote = self.message(message.reply_to)
        self._messages[len(self._entries)] = (message, me, tz, name, quote, quote_name)
        self._emit(message_renderable(message, me, tz, name, quote, quote_name))
        self.messages.append(message)
        if message.id:
            self._by_id[message.id] = message

    def add_preview(self, preview: RenderableType) -> None:
        """An image's preview (half blocks or a kitty/sixel graphic, or why there is none),
        under its message's text."""
        self._emit(Padding(preview, (0, 0, 0, 16)))

    def mark_receipt(self, ids: Iterable[bytes], status: str) -> bool:
        """Our messages with these IDs got a receipt: draw their marks again in place (states
        only go up: a late "delivered" leaves "read"). False when the log cannot (its size is
        not known yet, so its writes wait): the caller draws the chat again instead."""
        if not self._size_known:
            return False
        for message_id in ids:
            index = self._keys.get(message_id) if message_id else None
            shown = self._messages.get(index) if index is not None else None
            if index is None or shown is None:
                continue
            message, me, tz, name, quote, quote_name = shown
            if _RANK.get(status, 0) <= _RANK.get(message.receipt, 0):
                continue
            message = dataclasses.replace(message, receipt=status)
            self._messages[index] = (message, me, tz, name, quote, quote_name)
            self._replace(index, message_renderable(message, me, tz, name, quote, quote_name))
        return True

    def _replace(self, index: int, renderable: RenderableType) -> None:
        """Draw entry ``index`` again where it is: written at the end (RichLog's wrapping),
        then its lines moved into the entry's place."""
        start = self._starts[index]
        end = self._starts[index + 1] if index + 1 < len(self._starts) else len(self.lines)
        written = len(self.lines)
        self._entries[index] = renderable
        if index == self._marked:
            renderable = Styled(renderable, SELECTED_STYLE)
        self.write(renderable, expand=True, scroll_end=False)
        new = self.lines[written:]
        del self.lines[written:]
        self.lines[start:end] = new
        shift = len(new) - (end - start)
        for later in range(index + 1, len(self._starts)):
            self._starts[later] += shift
        self._line_cache.clear()
        self.virtual_size = Size(self._widest_line_width, len(self.lines))
        self.refresh()

    def add_notice(self, notice: Notice, today: datetime, tz: tzinfo | None) -> None:
        self._day(local(notice.time, tz), today)
        self._emit(notice_renderable(notice, tz))


class ComposeArea(TextArea):
    """Multi-line compose: Enter sends, Shift+Enter or Ctrl+J starts a new line."""

    class Submitted(TextualMessage):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            if self.text.strip():
                self.post_message(self.Submitted(self.text))
            return
        if event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)


# ---- the conversation list ----------------------------------------------------------------------


VERIFICATION_MARKS = {
    "verified": Text(" ✓", style="bold green"),
    "broken": Text(" ⚠", style="bold red"),
}


def conversation_prompt(row: Conversation, width: int = 24) -> Text:
    """Two lines: the title (with the verified mark, the timer, the unread count), then the
    last message."""
    title = Text("# " if row.is_group else "", style="bold cyan")
    if row.id == UNREADABLE:
        title_style = "bold red"
    elif row.id == OPERATOR:
        title_style = OPERATOR_STYLE
    else:
        title_style = "bold"
    title.append_text(safe_line(row.title, title_style))
    mark = VERIFICATION_MARKS.get(row.verification)
    timer = Text(f" ◷{short_timer(row.timer)}", style="yellow") if row.timer else None
    title.truncate(
        width
        - (5 if row.unread else 0)
        - (len(mark.plain) if mark else 0)
        - (len(timer.plain) if timer else 0),
        overflow="ellipsis",
    )
    if mark is not None:
        title.append_text(mark)
    if timer is not None:
        title.append_text(timer)
    if row.unread:
        title.append(f" ({row.unread})", style="bold yellow")
    preview = safe_line(row.preview, "dim") if row.preview else Text("no messages yet", "dim")
    preview.truncate(width, overflow="ellipsis")
    return Text("\n").join([title, preview])


class ConversationList(OptionList):
    """Peers and groups, most recent first, with unread counts and the last message."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, markup=False)

    def show(self, rows: Iterable[Conversation], selected: str | None) -> None:
        rows = list(rows)
        self.clear_options()
        self.add_options([Option(conversation_prompt(r), id=r.id) for r in rows])
        for index, row in enumerate(rows):
            if row.id == selected:
                self.highlighted = index


# ---- status and identity ------------------------------------------------------------------------


class StatusLine(Static):
    """Online or offline, and the next reconnection."""

    def set_state(
        self,
        online: bool | None,
        me: str,
        detail: str = "",
        alarm: bool = False,
        notice: str = "",
        via: str = "",
    ) -> None:
        """``via``: how the profile is reached when not by this app itself ("via daemon")."""
        if online is None:
            text = Text("◌ connecting…", style="yellow")
        elif online:
            text = Text("● online", style="bold green")
        else:
            text = Text("○ offline", style="bold red")
        if via:
            text.append(f" {via}", style="dim")
        if detail:
            text.append("  ")
            text.append_text(safe_line(detail, "dim"))
        if alarm:
            text.append("  ALARM: unknown device on your account", style="bold white on red")
        if notice:
            text.append("  ")
            text.append_text(safe_line(notice, f"{OPERATOR_STYLE} reverse"))
        text.append(f"   you: {me}", style="dim")
        self.update(text)


def qr_text(data: str, border: int = 2) -> Text:
    """``data`` as a QR code drawn with half blocks (two module rows per line), dark on light
    whatever the theme, so that phones can scan it from the screen."""
    code = segno.make(data, error="m")
    rows = [list(row) for row in code.matrix]
    size = len(rows[0])
    blank = [0] * (size + 2 * border)
    grid = [blank] * border + [[0] * border + r + [0] * border for r in rows] + [blank] * border
    if len(grid) % 2:
        grid.append(blank)
    lines = []
    for top, bottom in zip(grid[0::2], grid[1::2], strict=True):
        chars = []
        for t, b in zip(top, bottom, strict=True):
            chars.append({(0, 0): " ", (1, 0): "▀", (0, 1): "▄", (1, 1): "█"}[(t & 1, b & 1)])
        lines.append("".join(chars))
    return Text("\n".join(lines), style="black on white", no_wrap=True)
