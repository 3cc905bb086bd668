"""Several profiles (accounts) in one app: each its own backend and unlock, F8 to switch, the
others' unread counts in the heading, and no event of one in another's view."""

from __future__ import annotations

from datetime import UTC
from functools import partial
from pathlib import Path
from typing import Any

from textual.pilot import Pilot
from textual.widgets import Input, Static

from kluis.apps.tui.app import KluisApp
from kluis.apps.tui.screens.main import MainScreen
from kluis.apps.tui.screens.onboarding import UnlockScreen
from kluis.apps.tui.widgets import ChatLog, ConversationList
from kluis.client.events import DeviceAlarm, MessageReceived
from kluis.client.records import Message
from tests.apps.test_tui_server import make_app, until
from tests.apps.tui_fakes import ANNA, BRAM, ME, NOW, FakeBackend, wait_workers
from tests.kluis_testing import PASSPHRASE, ServerProcess, register

WORK = "work5q2zt7kd3vxa"


def two_profiles(tmp: Path, theme: str = "textual-dark") -> tuple[KluisApp, FakeBackend, Path]:
    home, work = tmp / "home", tmp / "work"
    backend = FakeBackend([], me=WORK)
    app = KluisApp(
        home,
        backends={home: FakeBackend(), work: backend},
        more_profiles=[work],
        clock=lambda: NOW,
        tz=UTC,
        cursor_blink=False,
        theme=theme,
    )
    return app, backend, work


def heading(screen: MainScreen) -> str:
    return str(screen.query_one("#profiles", Static).render())


def chat_text(screen: MainScreen) -> str:
    log = screen.query_one(ChatLog)
    return " ".join("".join(s.text for s in strip) for strip in log.lines)


def list_text(screen: MainScreen) -> str:
    options = screen.query_one(ConversationList).options
    return " ".join(str(option.prompt) for option in options)


async def settle(pilot: Pilot[Any]) -> None:
    await wait_workers(pilot.app)
    await pilot.pause()


async def test_f8_switches_profiles_and_events_stay_in_their_own(tmp_path: Path) -> None:
    app, work_backend, work = two_profiles(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        home = app.screen
        assert isinstance(home, MainScreen) and home.backend.account_id == ME
        assert "home" in heading(home) and "work" in heading(home) and "F8" in heading(home)
        await pilot.press("f8")
        await settle(pilot)
        office = app.screen
        assert isinstance(office, MainScreen) and office is not home
        assert office.backend.account_id == WORK and app.profile == work
        await pilot.press("f8")
        await settle(pilot)
        assert app.screen is home  # the same screen, kept while the other was shown

        work_backend.emit(MessageReceived(Message(BRAM, BRAM, NOW, "for work only")))
        work_backend.emit(DeviceAlarm("a device you did not add"))
        await until(pilot, lambda: office.book.get(BRAM) is not None)
        await settle(pilot)
        row = office.book.get(BRAM)
        assert row is not None and row.unread == 1 and row.preview == "for work only"
        assert app.screen is home  # the other profile's alarm waits for its own view
        assert "for work only" not in chat_text(home) + list_text(home)
        assert home.book.get(BRAM) is None or home.book.get(BRAM) != row
        assert "work (1)" in heading(home)

        await pilot.press("f8")
        await settle(pilot)
        assert app.screen.__class__.__name__ == "AlarmScreen"  # shown now, in its profile
        await pilot.press("enter")
        assert office.is_current
        assert "for work only" in list_text(office)
        assert "home" in heading(office) and "work (1)" not in heading(office)


async def test_a_message_to_the_hidden_profiles_open_chat_counts_as_unread(
    tmp_path: Path,
) -> None:
    app, work_backend, _ = two_profiles(tmp_path)
    work_backend.messages.append(Message(ANNA, ANNA, NOW, "earlier"))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("f8")
        await settle(pilot)
        office = app.screen
        assert isinstance(office, MainScreen) and office.book.open_id == ANNA
        reads = len(work_backend.read)
        await pilot.press("f8")
        await settle(pilot)
        work_backend.emit(MessageReceived(Message(ANNA, ANNA, NOW, "while away")))
        await until(pilot, lambda: (office.book.get(ANNA) or row0()).unread == 1)
        assert len(work_backend.read) == reads  # no read receipt for what nobody saw
        await pilot.press("f8")
        await settle(pilot)
        assert (office.book.get(ANNA) or row0()).unread == 0
        assert len(work_backend.read) == reads + 1


def is_online(app: KluisApp, profile: Path) -> bool:
    return profile in app.mains and app.mains[profile].online is True


def row0() -> Any:
    from kluis.apps.tui.model import Conversation

    return Conversation("", "", False)


async def test_two_profiles_against_a_server(server: ServerProcess, tmp_path: Path) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    clients = [await register(server, home), await register(server, work)]
    work_id = clients[1].account_id
    for client in clients:
        await client.close()
    peer = await register(server, tmp_path / "peer")
    app = make_app(home, server)
    app.profiles.append(work)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            for profile in (home, work):
                await until(pilot, lambda: isinstance(app.screen, UnlockScreen))
                assert app.profile == profile and profile.name in str(
                    app.screen.query_one("Label").render()
                )
                app.screen.query_one("#passphrase", Input).value = PASSPHRASE
                await pilot.press("enter")
                await until(pilot, partial(is_online, app, profile))
                if profile == home:
                    await pilot.press("f8")
            await pilot.press("f8")
            await until(pilot, lambda: app.screen is app.mains[home])

            await peer.send(work_id, "to work, not home")
            await until(pilot, lambda: app.mains[work].book.get(peer.account_id) is not None)
            await settle(pilot)
            row = app.mains[work].book.get(peer.account_id)
            assert row is not None and row.unread == 1
            assert app.mains[home].book.get(peer.account_id) is None
            assert "to work, not home" not in list_text(app.mains[home])
            assert "work (1)" in heading(app.mains[home])
            await pilot.press("f8")
            await until(pilot, lambda: app.screen is app.mains[work])
            assert "to work, not home" in list_text(app.mains[work])
    finally:
        await peer.close()


def test_one_folder_given_twice_is_one_profile(tmp_path: Path) -> None:
    """Two clients on one profile would write the same store: spellings of a folder count once."""
    same = tmp_path / "x" / ".." / "home"
    app = KluisApp(tmp_path / "home", more_profiles=[tmp_path / "work", same, tmp_path / "work"])
    assert app.profiles == [tmp_path / "home", tmp_path / "work"]
