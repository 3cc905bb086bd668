"""Files: send one (Ctrl+O), save one received (Ctrl+S), with a progress bar meanwhile.

Theory of operation: the dialogs only ask (a path and a caption; which file and where to save
it) and check what they can without touching the disk more than a ``stat``; the transfer runs
in a worker of the main screen that awaits the backend, which encrypts and streams on the
client's thread. That thread reports progress as (bytes done, bytes in all) through
:class:`TransferProgress` messages (``post_message`` is thread-safe), and the
:class:`TransferBar` above the compose box shows them until :class:`TransferProgress` says the
transfer ended. A file's name comes from its sender: it is shown escaped, and the client
sanitises it before it names a file on disk.
"""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message as TextualMessage
from textual.widgets import Input, Label, OptionList, ProgressBar, Static
from textual.widgets.option_list import Option

from kluis.apps.tui.model import human_size
from kluis.apps.tui.safe_text import safe_line
from kluis.apps.tui.screens.dialogs import _Dialog
from kluis.client.records import Message

__all__ = ["DEFAULT_SAVE_FOLDER", "AttachScreen", "SaveScreen", "TransferBar", "TransferProgress"]

DEFAULT_SAVE_FOLDER = "~/Downloads"


class TransferProgress(TextualMessage):
    """A transfer moved on (``done`` of ``total`` bytes), or ended (``finished``)."""

    def __init__(self, label: str, done: int, total: int, *, finished: bool = False) -> None:
        super().__init__()
        self.label, self.done, self.total, self.finished = label, done, total, finished


class TransferBar(Horizontal):
    """One line above the compose box while a file goes up or down."""

    DEFAULT_CSS = """
    TransferBar { height: 1; display: none; padding: 0 1; }
    TransferBar.active { display: block; }
    TransferBar #transfer-label { width: auto; max-width: 40; padding: 0 1 0 0; }
    """

    def compose(self) -> ComposeResult:
        yield Label(id="transfer-label")
        yield ProgressBar(id="transfer-bar", show_eta=False)

    def show(self, progress: TransferProgress) -> None:
        if progress.finished:
            self.remove_class("active")
            return
        self.add_class("active")
        label = safe_line(progress.label, "bold")  # a received file's name is its sender's
        label.append(" ")
        label.append(f"{human_size(progress.done)} / {human_size(progress.total)}", style="dim")
        self.query_one("#transfer-label", Label).update(label)
        self.query_one("#transfer-bar", ProgressBar).update(
            total=max(progress.total, 1), progress=progress.done
        )


class AttachScreen(_Dialog):
    """Which file to send, and a caption; dismisses with (path, caption)."""

    def __init__(self, title: str) -> None:
        super().__init__()
        self.conversation_title = title

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            title = Text("Send a file to ", style="bold")
            title.append_text(safe_line(self.conversation_title, "bold"))
            yield Static(title, classes="title")
            yield Label("File")
            yield Input(id="path", placeholder="~/Pictures/photo.jpg")
            yield Label("Caption (optional)")
            yield Input(id="caption")
            yield Static(id="error")
            yield Static("Encrypted on this device, then sent · Esc to cancel", classes="hint")

    @on(Input.Submitted, "#path")
    def _to_caption(self) -> None:
        self.query_one("#caption", Input).focus()

    @on(Input.Submitted, "#caption")
    def _submitted(self) -> None:
        raw = self.query_one("#path", Input).value.strip()
        if not raw:
            self.fail("which file? give its path")
            return
        path = Path(raw).expanduser()
        if not path.is_file():
            self.fail(f"no such file: {path}")
            return
        self.dismiss((path, self.query_one("#caption", Input).value.strip()))


class SaveScreen(_Dialog):
    """The files of the open conversation, newest first: pick one and a folder; dismisses with
    (AttachmentRef, folder)."""

    def __init__(self, files: list[Message], folder: str = DEFAULT_SAVE_FOLDER) -> None:
        super().__init__()
        self.files = [m for m in files if m.attachment is not None][::-1]
        self.folder = folder

    def compose(self) -> ComposeResult:
        options = []
        for index, m in enumerate(self.files):
            ref = m.attachment
            assert ref is not None
            line = safe_line(ref.name or "(no name)", "bold")
            line.append(f"  {human_size(ref.size)}  {m.time:%d %b %H:%M}", style="dim")
            options.append(Option(line, id=str(index)))
        with Vertical(classes="dialog"):
            yield Static(Text("Save a file", style="bold"), classes="title")
            yield Label("Into the folder")
            yield Input(self.folder, id="folder")
            if options:
                yield OptionList(*options, id="files")
            else:
                yield Static(Text("no files in this conversation", style="italic"))
            yield Static(id="error")
            yield Static("Enter on a file saves it · Esc to cancel", classes="hint")

    def on_mount(self) -> None:
        # (Textual runs _Dialog.on_mount too, after this one: it focuses the folder field)
        if self.files:
            self.call_after_refresh(self.query_one("#files", OptionList).focus)

    @on(Input.Submitted, "#folder")
    def _to_files(self) -> None:
        if self.files:
            self.query_one("#files", OptionList).focus()

    @on(OptionList.OptionSelected, "#files")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        raw = self.query_one("#folder", Input).value.strip()
        if not raw:
            self.fail("which folder? give its path")
            return
        folder = Path(raw).expanduser()
        if folder.exists() and not folder.is_dir():
            self.fail(f"not a folder: {folder}")
            return
        ref = self.files[int(event.option.id or "0")].attachment
        self.dismiss((ref, folder))
