"""First run (server, licence, passphrase twice, then the new ID as text and QR) and unlock."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Center, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Input, Label, Static

from kluis.apps.daemon import holder
from kluis.apps.tui.backend import ClientBackend
from kluis.apps.tui.model import strength
from kluis.apps.tui.remote import DaemonBackend, held_by_daemon
from kluis.apps.tui.safe_text import safe_line
from kluis.apps.tui.widgets import qr_text
from kluis.errors import KluisError, WrongPassphrase

if TYPE_CHECKING:
    from kluis.apps.tui.app import KluisApp


def _error_text(exc: BaseException) -> Text:
    if isinstance(exc, KluisError):
        return safe_line(f"{exc.code}: {exc}", "bold red")
    return safe_line(f"{type(exc).__name__}: {exc}", "bold red")


class OnboardingScreen(Screen[None]):
    """Create a profile: redeem a licence on a server, protect the profile with a passphrase."""

    app: KluisApp

    def __init__(self) -> None:
        super().__init__()
        self.profile = self.app.profile  # fixed: another profile may be shown meanwhile (F8)

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="onboarding", classes="form"):
            yield Static(Text("Welcome to Kluis", style="bold"), classes="title")
            yield Static(
                "Redeem a licence code to get an anonymous ID. Nothing personal is asked.",
                classes="hint",
            )
            yield Label("Server")
            yield Input(self.app.default_server, id="server", compact=True)
            yield Label("Licence code")
            yield Input(id="licence", placeholder="from your operator", compact=True)
            yield Label("Passphrase (protects this profile on this device)")
            yield Input(id="passphrase", password=True, compact=True)
            yield Static(id="strength", classes="hint")
            yield Label("Passphrase again")
            yield Input(id="passphrase2", password=True, compact=True)
            yield Static(id="error")
            yield Button("Create my ID", id="register", variant="primary", compact=True)

    def on_mount(self) -> None:
        for widget in self.query(Input):
            widget.cursor_blink = self.app.cursor_blink
        self.query_one("#licence", Input).focus()
        self._show_strength("")

    def _show_strength(self, value: str) -> None:
        s = strength(value)
        style = {"empty": "red", "weak": "red", "fair": "yellow", "strong": "green"}[s.label]
        self.query_one("#strength", Static).update(Text(f"strength: {s.hint}", style=style))

    @on(Input.Changed, "#passphrase")
    def _changed(self, event: Input.Changed) -> None:
        self._show_strength(event.value)

    @on(Input.Submitted)
    def _next(self, event: Input.Submitted) -> None:
        order = ["server", "licence", "passphrase", "passphrase2"]
        index = order.index(event.input.id or "server")
        if index + 1 < len(order):
            self.query_one(f"#{order[index + 1]}", Input).focus()
        else:
            self._submit()

    @on(Button.Pressed, "#register")
    def _pressed(self) -> None:
        self._submit()

    def _fail(self, text: str | Text) -> None:
        self.query_one("#error", Static).update(
            text if isinstance(text, Text) else Text(text, style="bold red")
        )

    def _submit(self) -> None:
        server = self.query_one("#server", Input).value.strip()
        licence = "".join(self.query_one("#licence", Input).value.split())
        first = self.query_one("#passphrase", Input).value
        second = self.query_one("#passphrase2", Input).value
        if not server or not licence:
            self._fail("the server and the licence code are both needed")
            return
        if not strength(first).acceptable:
            self._fail("refused: an empty passphrase would leave the profile open")
            return
        if first != second:
            self._fail("the two passphrases differ")
            return
        self._fail(Text("registering…", style="italic"))
        self.query_one("#register", Button).disabled = True
        self._register(server, licence, first)

    @work(exclusive=True, group="onboarding")
    async def _register(self, server: str, licence: str, passphrase: str) -> None:
        app = self.app
        try:
            backend = await ClientBackend.register(
                server,
                licence,
                self.profile,
                passphrase,
                transport_factory=app.transport_factory,
                kdf=app.kdf,
                backoff_base=app.backoff_base,
                backoff_cap=app.backoff_cap,
            )
        except Exception as exc:
            self.query_one("#register", Button).disabled = False
            self._fail(_error_text(exc))
            return
        app.enter_main(backend, show_id=True, profile=self.profile)


class UnlockScreen(Screen[None]):
    """Later runs: the passphrase opens the profile; or, when a ``kluis daemon`` holds it, the
    app attaches to the daemon (no passphrase: the daemon has the profile open)."""

    app: KluisApp

    def __init__(self) -> None:
        super().__init__()
        self.profile = self.app.profile  # fixed: another profile may be shown meanwhile (F8)

    def compose(self) -> ComposeResult:
        with Center(), Vertical(id="unlock", classes="form"):
            yield Static(Text("Kluis is locked", style="bold"), classes="title")
            yield Label(safe_line(f"Profile: {self.profile}"))
            yield Label("Passphrase")
            yield Input(id="passphrase", password=True)
            yield Static(id="error")

    def on_mount(self) -> None:
        field = self.query_one("#passphrase", Input)
        field.cursor_blink = self.app.cursor_blink
        field.focus()
        if held_by_daemon(self.profile):
            self._attach_daemon()

    @on(Input.Submitted, "#passphrase")
    def _submitted(self, event: Input.Submitted) -> None:
        if held_by_daemon(self.profile):  # started meanwhile, or Enter tries the socket again
            self._attach_daemon()
            return
        if not event.value:
            return
        self.query_one("#error", Static).update(Text("unlocking…", style="italic"))
        self._unlock(event.value)

    @work(exclusive=True, group="unlock")
    async def _unlock(self, passphrase: str) -> None:
        app = self.app
        try:
            backend = await ClientBackend.unlock(
                self.profile,
                passphrase,
                transport_factory=app.transport_factory,
                backoff_base=app.backoff_base,
                backoff_cap=app.backoff_cap,
            )
        except WrongPassphrase:
            self.query_one("#error", Static).update(Text("wrong passphrase", style="bold red"))
            self.query_one("#passphrase", Input).value = ""
            return
        except Exception as exc:
            self.query_one("#error", Static).update(_error_text(exc))
            return
        app.enter_main(backend, profile=self.profile)

    @work(exclusive=True, group="unlock")
    async def _attach_daemon(self) -> None:
        error = self.query_one("#error", Static)
        error.update(
            Text(f"a kluis daemon (pid {holder(self.profile)}) holds it: attaching…", "italic")
        )
        try:
            backend = await DaemonBackend.attach(self.profile)
        except Exception as exc:
            error.update(_error_text(exc))
            return
        self.app.enter_main(backend, profile=self.profile)


class IdScreen(ModalScreen[None]):
    """This account's ID, as text and as a QR code, to give to the people you write to."""

    BINDINGS = [Binding("escape,enter,q", "dismiss", "Close")]

    def __init__(self, account: str) -> None:
        super().__init__()
        self.account = account

    def compose(self) -> ComposeResult:
        with Vertical(id="id-box", classes="dialog"):
            yield Static(Text("Your ID", style="bold"), classes="title")
            yield Static(Text(self.account, style="bold reverse"), id="id-text")
            yield Static(qr_text(self.account), id="qr")
            yield Static("Give it to the people you write to. Enter to go on.", classes="hint")

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)
