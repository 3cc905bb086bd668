"""Replies in the app, driven by Textual's pilot over a fake backend: Ctrl+Up chooses an earlier
message, F6 quotes it in the compose area, the send carries its ID, and the chat view draws
quotes (sanitised), or says when the quoted message is not on this device."""

from __future__ import annotations

from pathlib import Path

from rich.style import Style

from kluis.apps.tui.widgets import SELECTED_STYLE, ChatLog, ComposeArea
from kluis.client.events import MessageReceived
from kluis.client.records import Message
from tests.apps.test_tui_features import log_lines, main_screen, open_, settle
from tests.apps.tui_fakes import ANNA, ME, NASTY, NOW, FakeBackend, at, fake_app


def history() -> list[Message]:
    return [
        Message(ANNA, ANNA, at(0, 9, 0), "first question", id=b"1" * 16),
        Message(ANNA, ANNA, at(0, 9, 1), NASTY, id=b"2" * 16),
        Message(ME, ANNA, at(0, 9, 2), "my answer", id=b"3" * 16),
    ]


def chosen_lines(app: object) -> list[str]:
    """The chat view's lines drawn as chosen (their background)."""
    log = main_screen(app).query_one(ChatLog)
    chosen = Style.parse(SELECTED_STYLE).bgcolor
    return [
        "".join(segment.text for segment in strip).strip()
        for strip in log.lines
        if any(seg.style is not None and seg.style.bgcolor == chosen for seg in strip)
    ]


def reply_bar(app: object) -> str:
    bar = main_screen(app).query_one("#reply-bar")
    return str(bar.render()) if bar.display else ""


async def test_ctrl_up_chooses_ctrl_r_quotes_and_the_send_carries_the_id(tmp_path: Path) -> None:
    backend = FakeBackend(history())
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await open_(pilot, ANNA)
        assert reply_bar(app) == ""
        await pilot.press("ctrl+up", "ctrl+up")  # from the newest back: the nasty one
        assert reply_bar(app).startswith(
            "F6 replies to ↪ annak3v7: ok\\r"
        ) and "\x1b" not in reply_bar(app)
        await pilot.press("ctrl+up", "ctrl+down", "ctrl+up")  # down and back: the first
        assert "first question" in reply_bar(app)
        assert [line for line in chosen_lines(app) if line] == ["09:00 annak3v7  first question"]
        await pilot.press("f6")
        assert reply_bar(app).startswith("Replying to ↪ annak3v7: first question")
        compose = main_screen(app).query_one(ComposeArea)
        assert compose.has_focus
        await pilot.press(*"yes", "enter")
        await settle(pilot)
        assert backend.sent[-1] == (ANNA, "yes") and backend.replies[-1] == b"1" * 16
        assert reply_bar(app) == ""  # the reply went: the next send quotes nothing
        assert chosen_lines(app) == []
        lines = [line.strip() for line in log_lines(app)]
        at_reply = lines.index(next(x for x in lines if "↪ annak3v7: first question" in x))
        assert lines[at_reply + 1].endswith("yes")

        # Escape forgets a reply; F6 alone quotes the newest message
        await pilot.press("f6")
        assert "yes" in reply_bar(app)
        await pilot.press("escape")
        assert reply_bar(app) == ""
        await pilot.press(*"plain", "enter")
        await settle(pilot)
        assert backend.replies[-1] == b""


async def test_received_replies_quote_from_the_history_or_say_it_is_missing(
    tmp_path: Path,
) -> None:
    backend = FakeBackend(history())
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        await open_(pilot, ANNA)
        backend.emit(MessageReceived(Message(ANNA, ANNA, NOW, "indeed", reply_to=b"3" * 16)))
        backend.emit(MessageReceived(Message(ANNA, ANNA, NOW, "hm?", reply_to=b"9" * 16)))
        backend.emit(MessageReceived(Message(ANNA, ANNA, NOW, "look", reply_to=b"2" * 16)))
        await settle(pilot)
        shown = "\n".join(line.strip() for line in log_lines(app))
        assert "↪ you: my answer" in shown
        assert "↪ a message you do not have" in shown
        assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown
        assert "↪ annak3v7: ok\\rannak3v7q2xw5zpe: fake\\x1b[2J" in shown
