"""Search over the local history: the messages and conversations this profile keeps.

Theory of operation: :func:`search_messages` is pure: it finds a query in message texts (and
file names), case-insensitively, newest first, up to a limit, and cuts each hit to a one-line
snippet around the match. :class:`HistorySearch` is a command-palette provider over it: when a
palette opens it loads the history once (through the backend, on the client's thread: the UI
does not wait), then answers each keystroke from memory; choosing a hit opens its
conversation at that message. Ctrl+F opens a palette with only this provider and the conversations; the
general palette (Ctrl+P) holds it too, next to the app's commands. Nothing leaves the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.command import CommandPalette, Hit, Hits, Provider

from kluis.apps.tui.safe_text import safe_line
from kluis.apps.tui.widgets import message_key
from kluis.client.records import Message

if TYPE_CHECKING:
    from textual.app import App

__all__ = [
    "MAX_HITS",
    "MIN_QUERY",
    "Found",
    "HistorySearch",
    "open_search",
    "search_messages",
]

MAX_HITS = 50  # hits shown per query (the newest)
MIN_QUERY = 2  # characters before messages are searched
SNIPPET = 48  # characters of a hit's line, around the match


@dataclass(frozen=True, slots=True)
class Found:
    """A message that holds the query; ``snippet[start:end]`` is the match."""

    conversation: str
    sender: str
    time: datetime
    snippet: str
    start: int
    end: int
    key: object = None  # the message's key in the chat view (widgets.message_key)


def _haystack(m: Message) -> str:
    name = m.attachment.name if m.attachment is not None else ""
    text = f"{name} {m.text}" if name else m.text
    return " ".join(text.split())  # one line: breaks and runs of blanks become a space


def search_messages(
    messages: Iterable[Message], query: str, *, limit: int = MAX_HITS, width: int = SNIPPET
) -> list[Found]:
    """The newest ``limit`` messages whose text (or file name) holds ``query`` (ignoring
    case and line breaks), each cut to about ``width`` characters around the match."""
    needle = " ".join(query.split()).lower()
    if len(needle) < MIN_QUERY:
        return []
    found: list[Found] = []
    for m in sorted(messages, key=lambda m: m.time, reverse=True):
        text = _haystack(m)
        lowered = text.lower()
        at = lowered.find(needle)
        if at < 0:
            continue
        if len(lowered) != len(text):  # lower() changed the length: no exact highlight
            at = 0
            end = 0
        else:
            end = at + len(needle)
        begin = max(0, min(at - width // 3, len(text) - width))
        snippet = text[begin : begin + width]
        prefix = "…" if begin > 0 else ""
        suffix = "…" if begin + width < len(text) else ""
        shift = len(prefix) - begin
        found.append(
            Found(
                m.conversation,
                m.sender,
                m.time,
                prefix + snippet + suffix,
                max(0, at + shift) if end else 0,
                min(len(prefix) + len(snippet), end + shift) if end else 0,
                message_key(m),
            )
        )
        if len(found) >= limit:
            break
    return found


def hit_text(found: Found, title: str, sender: str, when: str) -> Text:
    """``when title · sender: snippet``, the match highlighted, every peer string escaped."""
    line = Text(f"{when} ", style="dim")
    line.append_text(safe_line(title, "bold"))
    line.append(" · ", style="dim")
    line.append_text(safe_line(sender, "italic"))
    line.append(": ")
    snippet = safe_line(found.snippet)
    if snippet.plain == found.snippet and found.end > found.start:
        snippet.stylize("reverse bold", found.start, found.end)
    line.append_text(snippet)
    return line


class HistorySearch(Provider):
    """Messages of the local history that hold the query; choosing one opens its conversation."""

    _messages: list[Message]

    async def startup(self) -> None:
        self._messages = []
        from kluis.apps.tui.screens.main import MainScreen

        if isinstance(self.screen, MainScreen):  # its profile's history only
            self._messages = await self.screen.backend.history()

    async def search(self, query: str) -> Hits:
        from kluis.apps.tui.screens.main import MainScreen

        screen = self.screen
        if not isinstance(screen, MainScreen):
            return
        book, tz = screen.book, getattr(self.app, "tz", None)
        hits = search_messages(self._messages, query)
        for rank, found in enumerate(hits):
            when = found.time.astimezone(tz).strftime("%d %b %H:%M")
            display = hit_text(found, book.title(found.conversation), book.name(found.sender), when)
            # newest first, all above the fuzzy matches of commands with the same words
            score = 0.99 - rank / (10 * MAX_HITS)
            yield Hit(
                score,
                display,
                partial(screen.show_message, found.conversation, found.key),
                text=display.plain,
            )


class ConversationSearch(Provider):
    """The conversations, by title (nickname or group name) or ID."""

    def _rows(self) -> list[tuple[str, str, Callable[[], object]]]:
        from kluis.apps.tui.screens.main import MainScreen

        screen = self.screen
        if not isinstance(screen, MainScreen):
            return []
        return [
            (row.title, row.id, partial(screen.open_conversation, row.id))
            for row in screen.book.rows()
        ]

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, id_, open_ in self._rows():
            score = max(matcher.match(title), matcher.match(id_))
            if score > 0:
                label = Text("Open: ", style="dim")
                label.append_text(safe_line(title, "bold"))
                yield Hit(score, label, open_, text=label.plain, help=id_)


def open_search(app: App[Any]) -> None:
    """A palette over the history and the conversations only (Ctrl+F)."""
    if not CommandPalette.is_open(app):
        app.push_screen(
            CommandPalette(
                providers=[ConversationSearch, HistorySearch],
                placeholder="Search messages and conversations…",
                id="--command-palette",
            )
        )
