"""The app's screens driven by Textual's pilot over a fake backend (fast, no network): what
peers send is shown escaped, Enter sends, unreadable messages and alarms are never silent."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from kluis.apps.tui.backend import Offline, Online
from kluis.apps.tui.screens.dialogs import AlarmScreen, HelpScreen, MembersScreen
from kluis.apps.tui.screens.main import MainScreen
from kluis.apps.tui.widgets import ChatLog, ComposeArea, ConversationList
from kluis.client.events import DeviceAlarm, MessageReceived, Undecryptable
from kluis.client.records import Message
from tests.apps.tui_fakes import (
    ANNA,
    BRAM,
    GROUP,
    ME,
    NASTY,
    NOW,
    FakeBackend,
    fake_app,
    wait_workers,
)


def log_lines(app: object) -> list[str]:
    log = app.screen.query_one(ChatLog)  # type: ignore[attr-defined]
    return ["".join(segment.text for segment in strip).rstrip() for strip in log.lines]


def main_screen(app: object) -> MainScreen:
    screen = app.screen  # type: ignore[attr-defined]
    assert isinstance(screen, MainScreen)
    return screen


async def test_a_hostile_message_is_shown_escaped_and_unambiguous(tmp_path: Path) -> None:
    backend = FakeBackend([Message(ANNA, ANNA, NOW, NASTY)])
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        await wait_workers(app)
        await pilot.pause()
        lines = log_lines(app)
        text = "\n".join(lines)
        assert not any(ch in text for ch in "\r\x1b\x07\u202e\u202c")
        first = next(line for line in lines if "fake" in line)
        # the real sender's header, then the text: the spoofed ID stays inside the text
        assert first.startswith("16:30 annak3v7  ok\\rannak3v7q2xw5zpe: fake\\x1b[2J\\x07")
        rest = lines[lines.index(first) + 1 :]
        assert rest == [" " * 16 + "\\u202eevil\\u202c", " " * 16 + "second line"]
        # (wrapped and broken lines stay in the text's column: nothing looks like a header)
        # the conversation list shows the preview on one line, escaped too
        options = app.screen.query_one(ConversationList)
        prompt = str(options.get_option_at_index(0).prompt)
        assert "\\r" in prompt and "\r" not in prompt and "\n" in prompt  # title + preview


async def test_enter_sends_ctrl_j_adds_a_line_unread_counts_and_status(tmp_path: Path) -> None:
    backend = FakeBackend()
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_workers(app)
        screen = main_screen(app)
        assert screen.book.open_id == GROUP and screen.online is True
        compose = screen.query_one(ComposeArea)
        assert compose.has_focus
        await pilot.press("h", "i", "ctrl+j", "y", "o", "enter")
        await wait_workers(app)
        await pilot.pause()
        assert backend.sent == [(GROUP, "hi\nyo")]
        assert compose.text == ""
        assert log_lines(app)[-2:] == ["16:30 you       hi", " " * 16 + "yo"]

        backend.emit(MessageReceived(Message(BRAM, BRAM, NOW + timedelta(minutes=1), "psst")))
        await pilot.pause()
        assert screen.book.get(BRAM).unread == 1  # type: ignore[union-attr]
        assert screen.book.rows()[0].id == BRAM
        backend.emit(Offline("connection lost", 2.5))
        await pilot.pause()
        status = str(screen.query_one("#status").render())
        assert "offline" in status and "reconnecting in 2.5s" in status
        backend.emit(Online())
        await pilot.pause()
        assert "online" in str(screen.query_one("#status").render())


async def test_unreadable_messages_and_device_alarms_are_never_silent(tmp_path: Path) -> None:
    backend = FakeBackend(quarantined=2)
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_workers(app)
        screen = main_screen(app)
        backend.emit(Undecryptable("decryption", "no session with the sending device"))
        await pilot.pause()
        row = screen.book.get("!unreadable")
        assert row is not None and row.unread == 2
        screen.open_conversation("!unreadable")
        await wait_workers(app)
        await pilot.pause()
        shown = " ".join(line.strip() for line in log_lines(app))
        assert "2 earlier message(s) could not be read" in shown
        assert "unreadable message (decryption): no session" in shown

        backend.emit(DeviceAlarm("device abc is not certified by the account identity"))
        await pilot.pause()
        assert isinstance(app.screen, AlarmScreen)
        assert "ALARM" in str(screen.query_one("#status").render())
        await pilot.press("enter")
        assert isinstance(app.screen, MainScreen)


async def test_keys_help_theme_members_new_conversation_and_group(tmp_path: Path) -> None:
    backend = FakeBackend()
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_workers(app)
        screen = main_screen(app)
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        screen.query_one(ConversationList).focus()
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape", "ctrl+t")
        assert app.theme == "textual-light"
        await pilot.press("f2")
        assert isinstance(app.screen, MembersScreen)
        await pilot.press("escape", "ctrl+n")
        await pilot.press(*"notanid", "enter")
        assert "16 characters" in str(app.screen.query_one("#error").render())
        app.screen.query_one("#peer").value = ME  # type: ignore[attr-defined]
        await pilot.press("enter")
        assert "your own ID" in str(app.screen.query_one("#error").render())
        app.screen.query_one("#peer").value = ""  # type: ignore[attr-defined]
        await pilot.press(*"zzzz2222", "enter")
        assert "16 characters" in str(app.screen.query_one("#error").render())
        await pilot.press(*"zzzz2222", "enter")
        assert app.screen is screen  # type: ignore[comparison-overlap]
        assert screen.book.open_id == "zzzz2222zzzz2222"
        await pilot.press("ctrl+g", *"Walks", "enter")
        app.screen.query_one("#members").value = f"{ANNA}, {BRAM}"  # type: ignore[attr-defined]
        await pilot.press("enter")
        await wait_workers(app)
        await pilot.pause()
        opened = screen.book.get(screen.book.open_id or "")
        assert opened is not None and opened.title == "Walks" and len(opened.members) == 3
        # the command palette lists the app's commands
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"new", "space", *"group")
        await pilot.pause(0.5)
        await pilot.press("down", "enter")
        await pilot.pause()
        assert type(app.screen).__name__ == "NewGroupScreen"
