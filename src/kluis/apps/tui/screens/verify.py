"""SAS verification with a contact, side by side (F7 in a chat with a person).

Theory of operation: the dialog only shows; the flow is the client's (``client/verification.py``)
and runs through the app's one event stream. The main screen starts it
(``Backend.start_verification``), feeds this dialog what the flow's ``VerificationChanged``
events say (waiting, then the short code), and passes the user's answer back: "They match"
sends our MAC and waits for the peer's; "They differ" or Esc cancels on both sides. The main
screen closes the dialog when the flow ends (verified: the mark shows; cancelled: why).
"""

from __future__ import annotations

from collections.abc import Callable

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Static

from kluis.apps.tui.safe_text import safe_line
from kluis.apps.tui.screens.dialogs import _Dialog
from kluis.client.verification import ShortCode

__all__ = ["VerifyScreen"]


class VerifyScreen(_Dialog):
    """Verify ``peer`` (shown as ``title``): ``answer(True)`` when the user says the codes
    match; dismisses with "differ" or "cancel" (Esc), or None when the main screen closes it."""

    def __init__(self, peer: str, title: str, answer: Callable[[bool], None]) -> None:
        super().__init__()
        self.peer, self.title_, self._answer = peer, title, answer
        self.code: ShortCode | None = None
        self.confirmed = False
        self._state = ""

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="verify"):
            heading = Text("Verify ", style="bold")
            heading.append_text(safe_line(self.title_, "bold"))
            yield Static(heading, classes="title")
            yield Static(Text(self.peer, style="dim"))
            yield Static(
                "Sit side by side (or call). They press F7 in their chat with you.",
                id="verify-state",
            )
            yield Static(id="sas-emoji", classes="sas")
            yield Static(id="sas-decimals", classes="sas")
            with Horizontal(id="verify-buttons"):
                yield Button("They match", id="match", variant="success", disabled=True)
                yield Button("They differ", id="differ", variant="error", disabled=True)
            yield Static("Esc cancels", classes="hint")

    def on_mount(self) -> None:
        super().on_mount()
        self._draw()

    def state(self, text: str) -> None:
        """What the flow waits for (kept if the dialog is not drawn yet)."""
        self._state = text
        self._draw()

    def show_code(self, code: ShortCode) -> None:
        """Both sides have the short code: the user compares it with the peer's screen."""
        self.code = code
        self._state = "Do they see the same emoji, in the same order, and the same numbers?"
        self._draw()
        if self.is_mounted:
            self.query_one("#match", Button).focus()

    def _draw(self) -> None:
        if not self.is_mounted:
            return  # on_mount draws it
        if self._state:
            self.query_one("#verify-state", Static).update(Text(self._state))
        code = self.code
        if code is None:
            return
        grid = Table.grid(padding=(0, 2))
        for _ in code.emoji:
            grid.add_column(justify="center")
        grid.add_row(*(Text(symbol) for symbol, _ in code.emoji))
        grid.add_row(*(Text(name, style="bold") for _, name in code.emoji))
        self.query_one("#sas-emoji", Static).update(grid)
        self.query_one("#sas-decimals", Static).update(Text(code.decimal_line(), style="bold"))
        for button in self.query(Button):
            button.disabled = self.confirmed

    @on(Button.Pressed, "#match")
    def _match(self) -> None:
        if self.confirmed:
            return
        self.confirmed = True
        self.state("Confirmed: waiting for them to confirm too…")
        self._answer(True)

    @on(Button.Pressed, "#differ")
    def _differ(self) -> None:
        self.dismiss("differ")

    def action_cancel(self) -> None:
        self.dismiss("cancel")
