"""Small modal screens: new conversation, new group, group members, help, device alarm, key
change."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from kluis.apps.tui.keys import KEYS_FILE, active_keys
from kluis.apps.tui.model import Conversation, KeyWarning, is_account_id, parse_ids
from kluis.apps.tui.safe_text import safe_line
from kluis.client.contacts import MAX_NAME


class _Dialog(ModalScreen[object]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_mount(self) -> None:
        blink = getattr(self.app, "cursor_blink", True)
        for field in self.query(Input):
            field.cursor_blink = blink
        inputs = list(self.query(Input))
        if inputs:
            inputs[0].focus()

    def fail(self, text: str) -> None:
        self.query_one("#error", Static).update(Text(text, style="bold red"))


class NewConversationScreen(_Dialog):
    """Start a conversation with an account ID, and name it if you like; dismisses with
    (ID, nickname or "")."""

    def __init__(self, me: str) -> None:
        super().__init__()
        self.me = me

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text("New conversation", style="bold"), classes="title")
            yield Label("Their ID (16 characters)")
            yield Input(id="peer", placeholder="abcdefgh23456789")
            yield Label("Nickname (optional, only you see it)")
            yield Input(id="nickname", max_length=MAX_NAME)
            yield Static(id="error")
            yield Static("Enter to open · Tab to the nickname · Esc to cancel", classes="hint")

    @on(Input.Submitted, "#peer, #nickname")
    def _submitted(self) -> None:
        peer = self.query_one("#peer", Input).value.strip().lower()
        nickname = self.query_one("#nickname", Input).value.strip()
        if not is_account_id(peer):
            self.fail("an ID is 16 characters: a-z and 2-7")
        elif peer == self.me:
            self.fail("that is your own ID")
        elif not nickname.isprintable():
            self.fail("a nickname cannot hold control characters")
        else:
            self.dismiss((peer, nickname))


class NewGroupScreen(_Dialog):
    """A group's name and its members' IDs; dismisses with (name, [ids])."""

    def __init__(self, me: str) -> None:
        super().__init__()
        self.me = me

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text("New group", style="bold"), classes="title")
            yield Label("Name")
            yield Input(id="name")
            yield Label("Members' IDs (spaces or commas between them)")
            yield Input(id="members")
            yield Static(id="error")
            yield Static("Enter to create · Esc to cancel", classes="hint")

    @on(Input.Submitted, "#name")
    def _to_members(self) -> None:
        self.query_one("#members", Input).focus()

    @on(Input.Submitted, "#members")
    def _submitted(self) -> None:
        name = self.query_one("#name", Input).value.strip()
        try:
            members = [
                m for m in parse_ids(self.query_one("#members", Input).value) if m != self.me
            ]
        except ValueError as exc:
            self.fail(str(exc))
            return
        if not name:
            self.fail("a group needs a name")
        elif not members:
            self.fail("name at least one member besides you")
        else:
            self.dismiss((name, members))


class MembersScreen(_Dialog):
    """A group's name, ID and members, and its management: add members, remove the highlighted
    one (Delete), rename, leave. Dismisses with (action, accounts, name) for the change asked,
    or None (Esc)."""

    BINDINGS = [
        Binding("escape", "cancel", "Close"),
        Binding("delete", "remove", "Remove member"),
    ]

    def __init__(self, group: Conversation, me: str, names: dict[str, str] | None = None) -> None:
        super().__init__()
        self.group, self.me = group, me
        self.names = names or {}

    def compose(self) -> ComposeResult:
        options = []
        for member in self.group.members:
            line = Text(member)
            if member == self.me:
                line.append("  you", style="green")
            elif self.names.get(member):
                line.append("  ")
                line.append_text(safe_line(self.names[member], "dim"))
            options.append(Option(line, id=member))
        with Vertical(classes="dialog"):
            yield Static(safe_line(self.group.title, "bold"))
            yield Static(Text(f"group {self.group.id}", style="dim"))
            yield Static(Text(f"{len(self.group.members)} members", style="bold"))
            yield OptionList(*options, id="members-list")
            yield Label("Add members (IDs)")
            yield Input(id="add", compact=True, placeholder="abcdefgh23456789 …")
            yield Label("Rename")
            yield Input(self.group.title, id="rename", compact=True)
            yield Static(id="error")
            yield Button("Leave the group", id="leave", variant="error", compact=True)
            yield Static("Del removes the highlighted member · Esc to close", classes="hint")

    def on_mount(self) -> None:
        # (Textual runs _Dialog.on_mount too: it focuses the first field; the list goes first)
        self.call_after_refresh(self.query_one("#members-list", OptionList).focus)

    def action_remove(self) -> None:
        members = self.query_one("#members-list", OptionList)
        if members.highlighted is None or not members.has_focus:
            return
        member = members.get_option_at_index(members.highlighted).id or ""
        if member == self.me:
            self.fail("to go yourself, leave the group")
        else:
            self.dismiss(("remove", [member], None))

    @on(Input.Submitted, "#add")
    def _add(self, event: Input.Submitted) -> None:
        try:
            accounts = [a for a in parse_ids(event.value) if a not in self.group.members]
        except ValueError as exc:
            self.fail(str(exc))
            return
        if not accounts:
            self.fail("name at least one ID that is not a member yet")
        else:
            self.dismiss(("add", accounts, None))

    @on(Input.Submitted, "#rename")
    def _rename(self, event: Input.Submitted) -> None:
        name = event.value.strip()
        if not name or not name.isprintable():
            self.fail("a group name is printable text, not empty")
        elif name != self.group.title:
            self.dismiss(("rename", [], name))

    @on(Button.Pressed, "#leave")
    def _leave(self) -> None:
        self.dismiss(("leave", [], None))


FIXED_KEYS = [
    ("Enter", "send the message"),
    ("Shift+Enter, Ctrl+J", "new line in the message"),
    ("Tab, Shift+Tab", "move: list, chat, compose box"),
    ("Ctrl+P", "palette: commands, chats, messages"),
    ("Esc; Ctrl+Q", "close a dialog; quit"),
]
MARKS = "✓ delivered · ✓✓ read · ◷ disappearing messages are on"


class HelpScreen(_Dialog):
    BINDINGS = [Binding("escape,enter,q,question_mark", "cancel", "Close")]

    def compose(self) -> ComposeResult:
        keymap = getattr(self.app, "keys", {})
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for keys, what in [*FIXED_KEYS[:3], *active_keys(keymap), *FIXED_KEYS[3:]]:
            table.add_row(keys, what)
        with VerticalScroll(classes="dialog", id="help") as box:
            # In the border: seen at 80x24 even when the list below needs scrolling.
            box.border_title = "Keys"
            box.border_subtitle = f"set in {KEYS_FILE}: the profile's or ~/.config/kluis/"
            yield Static(table)
            yield Static(MARKS, classes="hint")
            yield Static("Others' control characters show escaped: \\x1b, \\u202e.", classes="hint")


class AlarmScreen(_Dialog):
    """A device alarm: loud, and stays until acknowledged."""

    BINDINGS = [Binding("enter", "cancel", "I understand")]

    def __init__(self, alarm: str) -> None:
        super().__init__()
        self.alarm = alarm

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog alarm"):
            yield Static(Text("ALARM: a device you did not add", style="bold"), classes="title")
            yield Static(safe_line(self.alarm))
            yield Static(
                "Your account lists a device that your identity did not certify. The server "
                "may be hostile. Kluis does not use that device. Press Enter to acknowledge.",
            )


class KeyChangeScreen(_Dialog):
    """A send refused because a contact's keys changed: stays until acknowledged (Enter, or
    the button); Escape does not dismiss it. Dismisses with True."""

    BINDINGS = [Binding("enter", "acknowledge", "I understand")]

    def __init__(self, warning: KeyWarning, contact: str) -> None:
        super().__init__()
        self.warning, self.contact = warning, contact
        self.acknowledged = False

    def compose(self) -> ComposeResult:
        w = self.warning
        title = Text("Key change: ", style="bold")
        title.append_text(safe_line(self.contact, "bold"))
        if w.kind == "broken":
            what = (
                "You verified this contact, but their keys changed since: "
                "a device you verified is gone or their identity is different."
            )
            then = (
                "Kluis did not send your message; it is kept in the compose box. Sending to "
                "this contact stays blocked until you verify them again (kluis verify), side "
                "by side or on a call. Press Enter to acknowledge."
            )
        else:
            what = (
                "This contact's device list holds a device that their identity did not "
                "certify. The server may be hostile."
            )
            then = (
                "Kluis did not send your message; it is kept in the compose box. Kluis does not "
                "encrypt to that device. Press Enter to acknowledge."
            )
        with Vertical(classes="dialog alarm", id="key-change"):
            yield Static(title, classes="title")
            yield Static(Text(f"account {w.account}", style="bold"))
            yield Static(what)
            yield Static(Text.assemble(("What changed: ", "bold"), safe_line(w.detail)))
            yield Static(then, id="key-change-then")
            yield Button("I understand", id="acknowledge", variant="error")

    def on_mount(self) -> None:
        self.query_one("#acknowledge", Button).focus()

    def action_cancel(self) -> None:
        """Escape does not dismiss: the warning must be acknowledged."""

    def action_acknowledge(self) -> None:
        if not self.acknowledged:
            self.acknowledged = True
            self.dismiss(True)

    @on(Button.Pressed, "#acknowledge")
    def _pressed(self) -> None:
        self.action_acknowledge()
