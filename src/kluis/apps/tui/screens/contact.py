"""Dialogs about one conversation: the peer's nickname (F3) and the disappearing-message timer
(F4).

A nickname is the user's own word for a peer: it replaces the ID in the list, the chat title
(the ID stays next to it) and as the sender of the peer's messages, here and on the user's
other devices (``ContactSync``). The timer dialog offers the settings people use, within the
client's limits (:data:`~kluis.client.timers.MIN_TIMER_S` to
:data:`~kluis.client.timers.MAX_TIMER_S`); the client checks them again.
"""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from kluis.apps.tui.safe_text import safe_line
from kluis.apps.tui.screens.dialogs import _Dialog
from kluis.client.contacts import MAX_NAME
from kluis.client.timers import MAX_TIMER_S, MIN_TIMER_S, describe

__all__ = ["TIMER_CHOICES", "NicknameScreen", "TimerScreen"]

TIMER_CHOICES = [0, 5 * 60, 3_600, 8 * 3_600, 86_400, 7 * 86_400, 4 * 7 * 86_400]
assert all(s == 0 or MIN_TIMER_S <= s <= MAX_TIMER_S for s in TIMER_CHOICES)


class NicknameScreen(_Dialog):
    """A name for ``account`` (dismisses with it; Esc changes nothing)."""

    def __init__(self, account: str, current: str) -> None:
        super().__init__()
        self.account, self.current = account, current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text("Nickname", style="bold"), classes="title")
            yield Label(Text(f"for {self.account}", style="dim"))
            yield Input(self.current, id="nickname", max_length=MAX_NAME, placeholder="e.g. Anna")
            yield Static(id="error")
            yield Static(
                "Only you see it, here and on your other devices. Enter to save · Esc to cancel",
                classes="hint",
            )

    @on(Input.Submitted, "#nickname")
    def _submitted(self, event: Input.Submitted) -> None:
        name = event.value.strip()
        if not name:
            self.fail(f"a nickname has 1 to {MAX_NAME} characters")
        elif not name.isprintable():
            self.fail("a nickname cannot hold control characters")
        else:
            self.dismiss(name)


class TimerScreen(_Dialog):
    """Pick the disappearing-message timer of a conversation; dismisses with seconds."""

    def __init__(self, title: str, current: int) -> None:
        super().__init__()
        self.conversation_title, self.current = title, current

    def compose(self) -> ComposeResult:
        choices = [
            Option(
                ("● " if seconds == self.current else "  ")
                + ("off" if seconds == 0 else describe(seconds)),
                id=str(seconds),
            )
            for seconds in TIMER_CHOICES
        ]
        with Vertical(classes="dialog"):
            title = Text("Disappearing messages in ", style="bold")
            title.append_text(safe_line(self.conversation_title, "bold"))
            yield Static(title, classes="title")
            yield OptionList(*choices, id="timer-choices")
            yield Static(
                "New messages disappear from every device this long after they were sent. "
                "Enter to set · Esc to cancel",
                classes="hint",
            )

    def on_mount(self) -> None:
        options = self.query_one("#timer-choices", OptionList)
        if self.current in TIMER_CHOICES:
            options.highlighted = TIMER_CHOICES.index(self.current)
        options.focus()

    @on(OptionList.OptionSelected, "#timer-choices")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(int(event.option.id or "0"))
