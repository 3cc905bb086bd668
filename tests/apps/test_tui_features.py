"""The app's messaging features driven by Textual's pilot over a fake backend: nicknames,
search over the local history, receipts and day separators, the disappearing-message timer,
operator notices and unreadable-message placeholders."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from textual.command import CommandPalette
from textual.pilot import Pilot
from textual.widgets import Button, Input, OptionList

from kluis.apps.tui.backend import Offline, Online
from kluis.apps.tui.model import Conversation
from kluis.apps.tui.screens.contact import NicknameScreen, TimerScreen
from kluis.apps.tui.screens.dialogs import MembersScreen
from kluis.apps.tui.screens.main import MainScreen
from kluis.apps.tui.search import search_messages
from kluis.apps.tui.widgets import ChatLog, ComposeArea, ConversationList
from kluis.client.events import (
    ContactChanged,
    MessageReceived,
    ReceiptReceived,
    Undecryptable,
)
from kluis.client.operator import OPERATOR
from kluis.client.records import Message
from kluis.errors import LocalProtocolError, NotSent
from tests.apps.tui_fakes import (
    ANNA,
    BRAM,
    GROUP,
    ME,
    NASTY,
    NOW,
    FakeBackend,
    at,
    fake_app,
    sample_history,
    wait_workers,
)

row0 = Conversation("", "", False)  # stands for a row not there


def main_screen(app: Any) -> MainScreen:
    screen = app.screen
    assert isinstance(screen, MainScreen), screen
    return screen


def log_lines(app: Any) -> list[str]:
    log = main_screen(app).query_one(ChatLog)
    return ["".join(segment.text for segment in strip).rstrip() for strip in log.lines]


def list_text(app: Any) -> str:
    options = main_screen(app).query_one(ConversationList)
    return "\n".join(
        str(options.get_option_at_index(i).prompt) for i in range(options.option_count)
    )


def title_text(app: Any) -> str:
    return str(main_screen(app).query_one("#chat-title").render())


def status_text(app: Any) -> str:
    return str(main_screen(app).query_one("#status").render())


async def settle(pilot: Pilot[Any]) -> None:
    await pilot.pause()
    await wait_workers(pilot.app)
    await pilot.pause()


async def open_(pilot: Pilot[Any], conversation: str) -> None:
    main_screen(pilot.app).open_conversation(conversation)
    await settle(pilot)


async def test_nicknames_in_the_list_the_header_and_as_senders_set_with_f3(
    tmp_path: Path,
) -> None:
    backend = FakeBackend(nicknames={ANNA: "Anna"})
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        listed = list_text(app)
        assert "Anna" in listed and ANNA not in listed
        assert BRAM in listed  # no nickname: the ID
        await open_(pilot, ANNA)
        assert "Anna" in title_text(app) and ANNA in title_text(app)  # the real ID next to it
        lines = log_lines(app)
        assert any(line.startswith("09:12 Anna") for line in lines), lines
        assert not any(ANNA[:8] in line for line in lines)
        # F3 names the open peer; an empty name is refused; Esc changes nothing
        await open_(pilot, BRAM)
        await pilot.press("f3")
        assert isinstance(app.screen, NicknameScreen)
        await pilot.press("enter")
        assert "1 to 64 characters" in str(app.screen.query_one("#error").render())
        await pilot.press(*"Bram B", "enter")
        await settle(pilot)
        assert backend.nicknames[BRAM] == "Bram B"
        assert "Bram B" in list_text(app) and BRAM not in list_text(app)
        assert "Bram B" in title_text(app)
        assert any(line.startswith("18:05 Bram B") for line in log_lines(app))
        await pilot.press("f3", "escape")
        assert backend.nicknames[BRAM] == "Bram B"
        # a refused change says why and keeps the old name
        backend.refuse = LocalProtocolError("not connected")
        await pilot.press("f3")
        app.screen.query_one("#nickname", Input).value = "Other"
        await pilot.press("enter")
        await settle(pilot)
        assert backend.nicknames[BRAM] == "Bram B" and "Other" not in list_text(app)
        backend.refuse = None
        # a name given on another of our devices arrives as an event
        backend.emit(ContactChanged(ANNA, "Anna K"))
        await settle(pilot)
        assert "Anna K" in list_text(app)
        # a new conversation may be named as it starts
        await pilot.press("ctrl+n", *"zzzz2222zzzz2222", "tab", *"Zed", "enter")
        await settle(pilot)
        assert backend.nicknames["zzzz2222zzzz2222"] == "Zed"
        assert main_screen(app).book.open_id == "zzzz2222zzzz2222"
        assert "Zed" in title_text(app) and "Zed" in list_text(app)
        # a group has no nickname: F3 says so
        await open_(pilot, GROUP)
        await pilot.press("f3")
        assert isinstance(app.screen, MainScreen)


def test_search_finds_text_newest_first_case_and_breaks_ignored() -> None:
    history = [
        *sample_history(),
        Message(ANNA, ANNA, at(0, 12, 0), "the AGENDA\nis long"),
        Message(ANNA, ANNA, at(0, 13, 0), "x" * 100 + " agenda " + "y" * 100),
    ]
    found = search_messages(history, "agenda")
    assert [f.time for f in found] == [at(0, 13, 0), at(0, 12, 0), at(0, 10, 40)]
    for f in found:
        assert f.snippet[f.start : f.end].lower() == "agenda"
        assert "\n" not in f.snippet
    assert found[0].snippet.startswith("…") and found[0].snippet.endswith("…")
    assert len(found[0].snippet) <= 50
    assert search_messages(history, "agenda is")[0].snippet == "the AGENDA is long"
    assert search_messages(history, "a") == []  # too short to search
    assert search_messages(history, "nowhere") == []
    assert len(search_messages(history * 30, "agenda", limit=5)) == 5


async def test_ctrl_f_searches_the_history_and_opens_the_conversation(tmp_path: Path) -> None:
    history = [*sample_history(), Message(BRAM, BRAM, NOW, "agenda " + NASTY)]
    app = fake_app(tmp_path, FakeBackend(history, nicknames={BRAM: "Bram"}))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await open_(pilot, ANNA)
        await pilot.press("ctrl+f")
        assert isinstance(app.screen, CommandPalette)
        await pilot.press(*"agenda")
        await pilot.pause(0.6)
        shown = app.export_screenshot()
        assert "Book&#160;club" in shown and "Bram" in shown  # the group's hit and Bram's
        assert "\\x1b" in shown and "\x1b[2J" not in shown  # a hostile hit is escaped
        await pilot.press("enter")  # the first hit: the newest, Bram's
        await settle(pilot)
        assert main_screen(app).book.open_id == BRAM
        # the general palette (Ctrl+P) finds messages too, next to the commands
        await pilot.press("ctrl+p")
        await pilot.press(*"shared file")
        await pilot.pause(0.6)
        await pilot.press("enter")
        await settle(pilot)
        assert main_screen(app).book.open_id == GROUP


async def test_receipts_day_separators_and_read_marks(tmp_path: Path) -> None:
    history = [
        Message(ANNA, ANNA, at(1, 9, 12), "Morning!"),
        Message(ME, ANNA, at(1, 9, 14), "read one", id=b"1" * 16, receipt="read"),
        Message(ME, ANNA, at(0, 8, 2), "delivered one", id=b"2" * 16, receipt="delivered"),
        Message(ME, ANNA, at(0, 8, 3), "sent one", id=b"3" * 16),
    ]
    backend = FakeBackend(history)
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await open_(pilot, ANNA)
        assert ANNA in backend.read  # opening it marks it read: read receipts go out
        lines = log_lines(app)
        assert [line.strip() for line in lines if "──" in line] == [
            "── Yesterday ──",
            "── Today ──",
        ]
        assert "09:14 you ✓✓    read one" in lines
        assert "08:02 you ✓     delivered one" in lines
        assert "08:03 you       sent one" in lines
        # receipts arrive: the marks are drawn again in place, without reading the history
        reads = backend.history_reads
        backend.emit(ReceiptReceived(ANNA, "delivered", ANNA, (b"3" * 16,)))
        backend.emit(ReceiptReceived(ANNA, "read", ANNA, (b"2" * 16,)))
        backend.emit(ReceiptReceived(ANNA, "delivered", ANNA, (b"1" * 16,)))  # late: stays read
        await pilot.pause(0.5)
        await settle(pilot)
        after = log_lines(app)
        assert "08:03 you ✓     sent one" in after
        assert "08:02 you ✓✓    delivered one" in after
        assert "09:14 you ✓✓    read one" in after
        assert len(after) == len(lines)  # every row where it was
        assert backend.history_reads == reads
        # a message arriving in the open conversation is read at once
        backend.read.clear()
        backend.emit(MessageReceived(Message(ANNA, ANNA, NOW, "new")))
        await settle(pilot)
        assert backend.read == [ANNA]


async def test_f4_sets_the_disappearing_timer_shown_in_list_and_header(tmp_path: Path) -> None:
    backend = FakeBackend(timers={BRAM: 300})
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert "◷5m" in list_text(app)
        await open_(pilot, ANNA)
        assert "◷" not in title_text(app)
        await pilot.press("f4")
        assert isinstance(app.screen, TimerScreen)
        choices = app.screen.query_one(OptionList)
        assert choices.highlighted == 0  # off, the current setting
        await pilot.press("down", "down", "enter")  # off, 5 min, 1 h
        await settle(pilot)
        assert backend._timers[ANNA] == 3600
        assert "◷ 1 h" in title_text(app)
        assert "Anna" not in list_text(app) and "◷1h" in list_text(app)
        assert any("disappearing messages: 1 h" in line for line in log_lines(app))
        # a timer line from the peer updates the mark
        backend._timers[ANNA] = 0
        backend.emit(
            MessageReceived(Message(ANNA, ANNA, NOW, "disappearing messages: off", kind="timer"))
        )
        await settle(pilot)
        assert "◷" not in title_text(app)
        await pilot.press("f4", "escape")
        assert isinstance(app.screen, MainScreen)


async def test_operator_notices_and_unreadable_placeholders_are_shown_apart(
    tmp_path: Path,
) -> None:
    renewal = "notice: your subscription ends on 2025-03-20; renew with kluis licence renew"
    backend = FakeBackend(renewal=renewal)
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        assert "subscription ends on 2025-03-20" in status_text(app)
        backend.emit(
            MessageReceived(Message(OPERATOR, OPERATOR, NOW, "Maintenance at 22:00\x1b[31m"))
        )
        await settle(pilot)
        assert "Operator notices" in list_text(app)
        backend.emit(
            MessageReceived(Message(OPERATOR, OPERATOR, NOW, "[link=https://x.example]pay[/link]"))
        )
        await settle(pilot)
        last = list(app._notifications)[-1]
        assert last.message == "[link=https://x.example]pay[/link]" and not last.markup
        await open_(pilot, OPERATOR)
        lines = " ".join(log_lines(app))
        assert "operator  Maintenance at 22:00\\x1b[31m" in lines
        assert "subscription ends on 2025-03-20" in lines  # the expiry notice is kept here too
        assert OPERATOR not in backend.read  # no read receipt for the operator
        # an unreadable message names its reason and the device it claims to come from
        backend.emit(
            Undecryptable("decryption", "bad MAC", sender=BRAM, device="DEVKEYabcdefghijkl")
        )
        await settle(pilot)
        await open_(pilot, "!unreadable")
        lines = " ".join(line.strip() for line in log_lines(app))
        assert "unreadable message (decryption): bad MAC" in lines
        assert f"claims to be from {BRAM}" in lines and "device DEVKEYabcdef" in lines


async def test_the_new_keys_are_listed_in_help(tmp_path: Path) -> None:
    app = fake_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("f1")
        shown = app.export_screenshot()
        for key in ("Ctrl+F", "F3", "F4"):
            assert key in shown


def last_change(backend: FakeBackend) -> tuple[str, list[str], str | None]:
    return backend.changes[-1]


async def test_f2_manages_a_group_add_remove_rename_leave(tmp_path: Path) -> None:
    backend = FakeBackend(nicknames={ANNA: "Anna"})
    app = fake_app(tmp_path, backend)
    zed = "zzzz2222zzzz2222"
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert main_screen(app).book.open_id == GROUP
        await pilot.press("f2")
        members = app.screen
        assert isinstance(members, MembersScreen)
        assert "Anna" in app.export_screenshot()  # the nickname next to the ID
        # Delete on yourself is refused; on Bram it removes him
        options = members.query_one("#members-list", OptionList)
        assert options.has_focus
        ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
        options.highlighted = ids.index(ME)
        await pilot.press("delete")
        assert "leave the group" in str(members.query_one("#error").render())
        options.highlighted = ids.index(BRAM)
        await pilot.press("delete")
        await settle(pilot)
        assert last_change(backend) == ("remove", [BRAM], None)
        assert BRAM not in (main_screen(app).book.get(GROUP) or row0).members
        # add by ID (a bad ID is refused), then rename
        await pilot.press("f2")
        app.screen.query_one("#add", Input).focus()
        await pilot.press(*"nope", "enter")
        assert "not an account ID" in str(app.screen.query_one("#error").render())
        app.screen.query_one("#add", Input).value = zed
        await pilot.press("enter")
        await settle(pilot)
        assert last_change(backend) == ("add", [zed], None)
        await pilot.press("f2")
        app.screen.query_one("#rename", Input).value = "Reading club"
        app.screen.query_one("#rename", Input).focus()
        await pilot.press("enter")
        await settle(pilot)
        assert last_change(backend) == ("rename", [], "Reading club")
        assert "Reading club" in title_text(app) and "Reading club" in list_text(app)
        # a refused change says why
        backend.refuse = LocalProtocolError("not connected")
        await pilot.press("f2")
        app.screen.query_one("#leave", Button).press()
        await settle(pilot)
        assert last_change(backend)[0] == "rename" and isinstance(app.screen, MainScreen)
        backend.refuse = None
        await pilot.press("f2")
        app.screen.query_one("#leave", Button).press()
        await settle(pilot)
        assert last_change(backend) == ("leave", [], None)
        assert ME not in (main_screen(app).book.get(GROUP) or row0).members


async def test_a_search_hit_opens_its_conversation_at_that_message(tmp_path: Path) -> None:
    talk = [
        Message(ANNA, ANNA, at(0, 9, 0) + timedelta(minutes=i), f"line {i}", id=bytes([i]) * 16)
        for i in range(60)
    ]
    backend = FakeBackend([*talk, Message(BRAM, BRAM, NOW, "elsewhere")])
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await open_(pilot, BRAM)
        await pilot.press("ctrl+f", *"line 7")  # one hit, an old one
        await pilot.pause(0.6)
        await pilot.press("enter")
        await settle(pilot)
        assert main_screen(app).book.open_id == ANNA
        log = main_screen(app).query_one(ChatLog)
        top = "".join(s.text for s in log.lines[int(log.scroll_y)]).strip()
        assert top == "09:07 annak3v7  line 7"
        assert log.scroll_y < log.max_scroll_y  # not at the end
        # sending brings the end back
        await pilot.press(*"hi", "enter")
        await settle(pilot)
        assert log.scroll_y == log.max_scroll_y


async def test_a_hostile_group_name_is_escaped_in_the_palettes(tmp_path: Path) -> None:
    backend = FakeBackend()
    backend._groups[0].name = "evil\x1b[2J\x07club"
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        for key in ("ctrl+p", "ctrl+f"):
            await pilot.press(key, *"evil")
            await pilot.pause(0.6)
            shown = app.export_screenshot()
            assert "\\x1b" in shown and "\x1b" not in shown and "\x07" not in shown
            await pilot.press("escape")


async def test_a_send_kept_in_the_outbox_is_not_given_back_and_shows_once_online(
    tmp_path: Path,
) -> None:
    backend = FakeBackend()
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await open_(pilot, ANNA)
        backend.refuse = NotSent("kept in the outbox (connection lost)")
        compose = main_screen(app).query_one(ComposeArea)
        compose.focus()
        await pilot.press(*"later", "enter")
        await settle(pilot)
        assert compose.text == ""  # not given back: it would go twice
        assert "kept in the outbox" in list(app._notifications)[-1].message
        # on reconnection the client sends it from the outbox; the chat is drawn again
        backend.refuse = None
        backend.messages.append(Message(ME, ANNA, NOW, "later"))
        backend.emit(Offline("connection lost", 0.5))
        backend.emit(Online())
        await settle(pilot)
        assert any(line.endswith("later") for line in log_lines(app))
        # one the server refused on reconnection is dropped, and said, in the chat too
        backend.refused = [(ANNA, "untrusted_device: no device to send to")]
        backend.emit(Online())
        await settle(pilot)
        shown = " ".join(line.strip() for line in log_lines(app))
        assert "not sent, dropped from the outbox: to annak3v7q2xw5zpe: untrusted_device" in shown
        assert "dropped from the outbox" in list(app._notifications)[-1].message
        backend.emit(Online())  # said once, and kept in the chat when it is drawn again
        await settle(pilot)
        again = " ".join(line.strip() for line in log_lines(app))
        assert again.count("dropped from the outbox") == 1
