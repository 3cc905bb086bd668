"""``kluis chat``: the Textual application.

    KluisApp(Path("~/.kluis/me").expanduser()).run()

The app starts on the first-run screen when the profile folder holds no profile, else on the
unlock screen (which attaches to the ``kluis daemon`` holding the profile, if one does, without
asking for the passphrase); tests and screenshots may hand it a ready
:class:`~.backend.Backend` instead.

Several profiles (accounts) may be open at once (``more_profiles``): each has its own backend,
connection and unlock, and its own :class:`MainScreen`, installed so that it lives on while
another is shown; F8 goes to the next profile (unlocking it on its first visit). A screen
hears only its own backend's events, so nothing of one profile shows in another's view; the
other profiles' unread counts show in the sidebar's heading.

``keymap`` (action -> keys, from :func:`~.keys.load_keymap`) replaces default keys.
``images`` is how image previews are drawn (:class:`~.graphics.Mode`): half blocks unless the
caller ran :func:`~.graphics.detect` before :meth:`run` (``kluis chat`` does), as the terminal
can be asked only then.
Time is injected (``clock``, ``tz``) and the cursor blink can be turned off, so that screenshots
are the same on every run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, tzinfo
from functools import partial
from pathlib import Path

from textual.app import App
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.notifications import SeverityLevel
from textual.screen import ModalScreen, Screen

from kluis.apps.tui.backend import Backend, profile_exists
from kluis.apps.tui.graphics import Mode
from kluis.apps.tui.model import ProfileTab
from kluis.apps.tui.safe_text import safe_line
from kluis.apps.tui.screens.dialogs import HelpScreen
from kluis.apps.tui.screens.main import MainScreen
from kluis.apps.tui.screens.onboarding import IdScreen, OnboardingScreen, UnlockScreen
from kluis.apps.tui.search import HistorySearch
from kluis.client.transport import TransportFactory, WebSocketTransport
from kluis.crypto.profile_key import KdfParams
from kluis.errors import LocalProtocolError

CSS = """
Screen { layers: base overlay; }
.heading { height: 1; padding: 0 1; background: $panel; }
.title { padding: 0 0 1 0; }
.hint { color: $text-muted; }
#error { height: auto; }
#sidebar { width: 28; border-right: tall $primary 40%; }
#conversations { height: 1fr; border: none; padding: 0; }
#chat { width: 1fr; }
#log { height: 1fr; padding: 0 1; scrollbar-size-vertical: 1; }
#compose { height: 4; border: round $primary; }
#reply-bar { height: 1; padding: 0 1; display: none; background: $boost; }
#compose:focus { border: round $accent; }
#status { height: 1; padding: 0 1; background: $panel; }
.form { width: 72; max-width: 100%; height: auto; max-height: 100%; padding: 1 2;
        border: round $primary; margin: 0 2; }
#onboarding { align: left top; }
#onboarding Input { margin: 0 0 1 0; }
#onboarding Label { margin: 0; }
#unlock { margin-top: 4; }
ModalScreen { align: center middle; }
.dialog { width: 70; max-width: 100%; height: auto; max-height: 100%; padding: 1 2;
          border: thick $primary; background: $surface; }
.dialog.alarm { border: thick $error; background: $error 30%; }
#id-box { width: auto; min-width: 40; }
#qr { width: auto; }
#members-list { height: auto; max-height: 6; }
#files { height: auto; max-height: 10; }
#help { padding: 0 2; border-title-style: bold; }
#verify-buttons { height: auto; margin: 1 0 0 0; }
#verify-buttons Button { margin: 0 2 0 0; }
.sas { margin: 1 0 0 0; height: auto; }
"""


class KluisCommands(Provider):
    """The command palette: the app's commands and the conversations to jump to."""

    def _commands(self) -> list[tuple[str, str, Callable[[], object]]]:
        app = self.app
        assert isinstance(app, KluisApp)
        commands: list[tuple[str, str, Callable[[], object]]] = [
            ("Toggle light/dark theme", "switch the colours", app.action_toggle_dark_theme),
            ("Help: keys", "every key binding", app.action_help),
        ]
        screen = self.screen  # the screen the palette was opened on
        if isinstance(screen, MainScreen):
            commands += [
                ("New conversation", "start a chat by ID", screen.action_new_conversation),
                ("New group", "name it and add members", screen.action_new_group),
                ("Group members", "of the open group", screen.action_members),
                ("My ID", "as text and QR code", screen.action_show_id),
                ("Search messages", "in the local history", screen.action_search),
                ("Nickname", "name the open conversation's peer", screen.action_nickname),
                ("Disappearing messages", "the open conversation's timer", screen.action_timer),
                ("Send a file", "to the open conversation", screen.action_attach),
                ("Save a file", "received in the open conversation", screen.action_save_file),
                ("Reply", "to the chosen (else the last) message", screen.action_reply),
                ("Verify contact", "compare emoji side by side (SAS)", screen.action_verify),
            ]
            for row in screen.book.rows():
                label = f"Open: {safe_line(row.title).plain}"  # a group name is a peer's
                commands.append((label, row.id, partial(screen.open_conversation, row.id)))
        return commands

    async def discover(self) -> Hits:
        for name, help_, run in self._commands():
            yield DiscoveryHit(name, run, help=help_)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_, run in self._commands():
            score = max(matcher.match(name), matcher.match(help_))
            if score > 0:
                yield Hit(score, matcher.highlight(name), run, help=help_)


class KluisApp(App[None]):
    TITLE = "Kluis"
    CSS = CSS
    COMMANDS = App.COMMANDS | {KluisCommands, HistorySearch}
    BINDINGS = [
        Binding("question_mark", "help", "Help", key_display="?", id="help"),
        Binding("f1", "help", "Help", show=False),
        Binding("ctrl+t", "toggle_dark_theme", "Theme", id="toggle_dark_theme", show=False),
        Binding("f8", "next_profile", "Profile", id="next_profile", show=False, priority=True),
    ]

    def __init__(
        self,
        profile: Path,
        *,
        backend: Backend | None = None,
        transport_factory: TransportFactory = WebSocketTransport,
        clock: Callable[[], datetime] | None = None,
        tz: tzinfo | None = None,
        cursor_blink: bool = True,
        kdf: KdfParams | None = None,
        default_server: str = "http://127.0.0.1:8448",
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        theme: str = "textual-dark",
        keymap: Mapping[str, str] | None = None,
        more_profiles: Sequence[Path] = (),
        backends: Mapping[Path, Backend] | None = None,
        images: Mode = Mode.HALFBLOCK,
    ) -> None:
        super().__init__()
        self.images = images
        self.keys = dict(keymap or {})  # action -> keys, checked (see keys.load_keymap)
        # one screen and one backend per profile folder, however it is spelt: two clients on
        # one profile would write the same encrypted store
        folders: dict[Path, Path] = {}
        for folder in (profile, *more_profiles):
            folders.setdefault(folder.resolve(), folder)
        self.profiles: list[Path] = list(folders.values())
        self.current = profile
        self.backends: dict[Path, Backend] = dict(backends or {})
        if backend is not None:
            self.backends[profile] = backend
        self.mains: dict[Path, MainScreen] = {}  # installed, one per unlocked profile
        self.transport_factory = transport_factory
        self._clock = clock or (lambda: datetime.now(UTC))
        self.tz = tz
        self.cursor_blink = cursor_blink
        self.kdf = kdf
        self.default_server = default_server
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.theme = theme

    @property
    def profile(self) -> Path:
        """The profile shown (the one an unlock or first-run screen opens)."""
        return self.current

    @property
    def backend(self) -> Backend | None:
        return self.backends.get(self.current)

    def now(self) -> datetime:
        return self._clock().astimezone(self.tz)

    @property
    def backend_required(self) -> Backend:
        if self.backend is None:
            raise LocalProtocolError("the profile is not open")
        return self.backend

    def on_mount(self) -> None:
        if self.keys:
            self.set_keymap(self.keys)
        self._show_profile(self.current, first=True)

    def _show_profile(self, profile: Path, *, first: bool = False) -> None:
        self.current = profile
        backend = self.backends.get(profile)
        if profile in self.mains:
            screen: Screen[None] | str = f"profile-{self.profiles.index(profile)}"
        elif backend is not None:
            main = MainScreen(backend, profile)
            self.mains[profile] = main
            screen = f"profile-{self.profiles.index(profile)}"
            self.install_screen(main, screen)
        elif profile_exists(profile):
            screen = UnlockScreen()
        else:
            screen = OnboardingScreen()
        if first:
            self.push_screen(screen)
        else:
            self.switch_screen(screen)
        self.profiles_changed()

    def enter_main(
        self, backend: Backend, *, show_id: bool = False, profile: Path | None = None
    ) -> None:
        """``profile`` (the one shown, by default) is open: show its chats, unless another
        profile is shown by now (then at its turn)."""
        profile = profile or self.current
        self.backends[profile] = backend
        if profile != self.current:
            self.profiles_changed()
            return
        self._show_profile(profile)
        if show_id:
            self.push_screen(IdScreen(backend.account_id))

    def action_next_profile(self) -> None:
        """Show the next profile (F8): its chats, or its unlock screen on the first visit."""
        if len(self.profiles) < 2:
            self.notify("one profile is open: start with --profile DIR --profile DIR2")
            return
        if isinstance(self.screen, ModalScreen):
            self.notify("close the dialog first", severity="warning")
            return
        index = self.profiles.index(self.current)
        self._show_profile(self.profiles[(index + 1) % len(self.profiles)])

    def profile_tabs(self) -> list[ProfileTab]:
        """Every profile as the sidebar's heading shows it (more than one profile only)."""
        tabs = []
        for profile in self.profiles:
            main = self.mains.get(profile)
            tabs.append(
                ProfileTab(
                    profile.name or str(profile),
                    main.book.unread() if main is not None else 0,
                    profile == self.current,
                    main is None,
                )
            )
        return tabs

    def profiles_changed(self) -> None:
        """Unread counts or the shown profile changed: every open profile's heading redraws."""
        if len(self.profiles) > 1:
            for main in self.mains.values():
                main.show_profiles()

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
        markup: bool = False,
    ) -> None:
        """As Textual's, but markup is off unless asked for: a notification often quotes a
        peer (an announcement, a file name, an error), and ``[link=...]`` there must stay
        text."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_toggle_dark_theme(self) -> None:
        self.theme = "textual-light" if self.theme == "textual-dark" else "textual-dark"

    async def on_unmount(self) -> None:
        for backend in self.backends.values():
            await backend.close()
