"""Files in the app (fake backend): Ctrl+O sends one with a progress bar meanwhile, Ctrl+S
saves a received one into a folder; a file's name from a peer is shown escaped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual.pilot import Pilot
from textual.widgets import Input, OptionList

from kluis.apps.tui.model import human_size
from kluis.apps.tui.screens.files import AttachScreen, SaveScreen, TransferBar
from kluis.apps.tui.screens.main import MainScreen
from kluis.apps.tui.widgets import ChatLog
from kluis.client.records import Message
from kluis.protocol.attachment import AttachmentRef
from tests.apps.tui_fakes import ANNA, NOW, FakeBackend, fake_app, wait_workers


def main_screen(app: Any) -> MainScreen:
    screen = app.screen
    assert isinstance(screen, MainScreen), screen
    return screen


def log_text(app: Any) -> str:
    log = main_screen(app).query_one(ChatLog)
    return "\n".join("".join(s.text for s in strip).rstrip() for strip in log.lines)


async def settle(pilot: Pilot[Any]) -> None:
    await pilot.pause()
    await wait_workers(pilot.app)
    await pilot.pause()


def test_sizes_read_like_sizes() -> None:
    assert [human_size(n) for n in (0, 999, 1536, 12 * 2**20, 3 * 2**30)] == [
        "0 B",
        "999 B",
        "1.5 KiB",
        "12.0 MiB",
        "3.0 GiB",
    ]


async def test_ctrl_o_sends_a_file_with_a_progress_bar_and_ctrl_s_saves_it(
    tmp_path: Path,
) -> None:
    backend = FakeBackend()
    app = fake_app(tmp_path, backend)
    document = tmp_path / "report.pdf"
    document.write_bytes(bytes(range(256)) * 12)  # 3 KiB
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        main_screen(app).open_conversation(ANNA)
        await settle(pilot)
        await pilot.press("ctrl+o")
        assert isinstance(app.screen, AttachScreen)
        await pilot.press(*"nowhere.txt", "enter", "enter")
        assert "no such file" in str(app.screen.query_one("#error").render())
        app.screen.query_one("#path", Input).value = str(document)
        app.screen.query_one("#caption", Input).value = "the report"
        backend.hold.clear()  # the upload waits mid-way
        await pilot.press("enter")
        await pilot.pause(0.2)
        bar = main_screen(app).query_one(TransferBar)
        assert bar.has_class("active") and bar.display
        assert "↑ report.pdf 0 B / 3.0 KiB" in str(bar.query_one("#transfer-label").render())
        backend.hold.set()
        await settle(pilot)
        assert not bar.has_class("active")
        assert "[file] report.pdf (3.0 KiB)" in log_text(app)
        assert "the report" in log_text(app)

        await pilot.press("ctrl+s")
        await settle(pilot)
        assert isinstance(app.screen, SaveScreen)
        out = tmp_path / "saved"
        app.screen.query_one("#folder", Input).value = str(out)
        assert app.screen.query_one("#files", OptionList).has_focus  # Enter picks a file
        await pilot.press("enter")
        await settle(pilot)
        assert (out / "report.pdf").read_bytes() == document.read_bytes()
        assert isinstance(app.screen, MainScreen)


async def test_a_peers_file_name_is_shown_escaped_when_saving(tmp_path: Path) -> None:
    name = "evil\x1b[2J\u202etxt.exe"
    ref = AttachmentRef(id="a" * 32, key=b"k" * 32, digest=b"d" * 32, size=5, name=name)
    backend = FakeBackend([Message(ANNA, ANNA, NOW, "", attachment=ref)])
    backend.blobs[ref.id] = b"12345"
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        main_screen(app).open_conversation(ANNA)
        await settle(pilot)
        assert "[file] evil\\x1b[2J\\u202etxt.exe" in log_text(app)
        await pilot.press("ctrl+s")
        await settle(pilot)
        prompt = str(app.screen.query_one("#files", OptionList).get_option_at_index(0).prompt)
        assert prompt.startswith("evil\\x1b[2J\\u202etxt.exe  5 B")
        assert "\x1b" not in app.export_screenshot()
        # a file where the folder should be is refused
        blocker = tmp_path / "blocker"
        blocker.write_text("x")
        app.screen.query_one("#folder", Input).value = str(blocker)
        app.screen.query_one("#files", OptionList).focus()
        await pilot.press("enter")
        assert "not a folder" in str(app.screen.query_one("#error").render())
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)
