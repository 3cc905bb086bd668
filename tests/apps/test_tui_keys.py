"""Key changes in the app (fake backend): the verified mark, and a send refused for a key
change shows a warning that must be acknowledged, keeps the draft and blocks the compose box."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import Button

from kluis.apps.tui.screens.dialogs import KeyChangeScreen
from kluis.apps.tui.screens.main import MainScreen
from kluis.apps.tui.widgets import ComposeArea, ConversationList
from kluis.client.verification import Status
from kluis.errors import UntrustedDevice, VerificationBroken
from tests.apps.tui_fakes import ANNA, BRAM, FakeBackend, fake_app, wait_workers


def main_screen(app: object) -> MainScreen:
    screen = app.screen  # type: ignore[attr-defined]
    assert isinstance(screen, MainScreen)
    return screen


def top(app: object) -> object:
    return app.screen  # type: ignore[attr-defined]


def list_text(app: object) -> str:
    options = main_screen(app).query_one(ConversationList)
    return "\n".join(
        str(options.get_option_at_index(i).prompt) for i in range(options.option_count)
    )


async def test_verified_contacts_are_marked(tmp_path: Path) -> None:
    backend = FakeBackend()
    backend.statuses[ANNA] = (Status.VERIFIED, "")
    backend.statuses[BRAM] = (Status.BROKEN, "device x revoked")
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        await wait_workers(app)
        await pilot.pause()
        book = main_screen(app).book
        assert (book.get(ANNA) or book.ensure(ANNA)).verification == "verified"
        assert (book.get(BRAM) or book.ensure(BRAM)).verification == "broken"
        text = list_text(app)
        assert "✓" in text and "⚠" in text
        main_screen(app).open_conversation(ANNA)
        await wait_workers(app)
        await pilot.pause()
        assert "✓ verified" in str(app.screen.query_one("#chat-title").render())


async def test_a_broken_verification_must_be_acknowledged_and_keeps_the_draft(
    tmp_path: Path,
) -> None:
    backend = FakeBackend()
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        await wait_workers(app)
        main_screen(app).open_conversation(ANNA)
        await wait_workers(app)
        backend.statuses[ANNA] = (Status.BROKEN, "its device abcdefgh… was revoked")
        backend.refuse = VerificationBroken(f"{ANNA} was verified, but ...", account=ANNA)
        screen = main_screen(app)
        screen.query_one(ComposeArea).focus()
        await pilot.press(*"secret", "enter")
        await wait_workers(app)
        await pilot.pause()
        warning = app.screen
        assert isinstance(warning, KeyChangeScreen)
        shown = app.export_screenshot()
        assert ANNA in shown and "revoked" in shown and "kluis&#160;verify" in shown
        assert screen.query_one(ComposeArea).text == "secret"  # the draft is kept
        assert screen.query_one(ComposeArea).read_only
        assert screen.book.get(ANNA) is not None
        assert (screen.book.get(ANNA) or screen.book.ensure(ANNA)).verification == "broken"
        await pilot.press("escape")  # not enough
        assert app.screen is warning
        await pilot.press("enter")
        await pilot.pause()
        assert top(app) is screen
        compose = screen.query_one(ComposeArea)
        assert not compose.read_only and compose.has_focus and compose.text == "secret"
        assert backend.sent == []  # nothing was sent


async def test_an_uncertified_device_warns_too(tmp_path: Path) -> None:
    backend = FakeBackend()
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        await wait_workers(app)
        main_screen(app).open_conversation(BRAM)
        backend.refuse = UntrustedDevice(f"device abcd… is not certified by the identity of {BRAM}")
        main_screen(app).query_one(ComposeArea).focus()
        await pilot.press(*"hi", "enter")
        await wait_workers(app)
        await pilot.pause()
        assert isinstance(app.screen, KeyChangeScreen)
        assert "not&#160;certified" in app.export_screenshot()
        app.screen.query_one("#acknowledge", Button).press()
        await pilot.pause()
        assert isinstance(app.screen, MainScreen)
        assert app.screen.query_one(ComposeArea).text == "hi"
