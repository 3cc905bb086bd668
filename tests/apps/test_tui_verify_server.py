"""SAS verification inside the app, against a real server process: two app instances verify
each other side by side through their one event stream (F7, the emoji, "They match"), and both
show the verified mark; when one says the codes differ, neither does."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from textual.pilot import Pilot
from textual.widgets import Button, Input

from kluis.apps.tui.app import KluisApp
from kluis.apps.tui.screens.verify import VerifyScreen
from kluis.client.verification import Status
from tests.apps.test_tui_server import is_online, main, make_app, row0, shown, until
from tests.kluis_testing import PASSPHRASE, ServerProcess, register


async def two_apps_to_verify(
    server: ServerProcess, tmp_path: Path
) -> tuple[str, str, KluisApp, KluisApp]:
    alice_client = await register(server, tmp_path / "alice")
    bob_client = await register(server, tmp_path / "bob")
    ids = alice_client.account_id, bob_client.account_id
    await alice_client.close()
    await bob_client.close()
    return *ids, make_app(tmp_path / "alice", server), make_app(tmp_path / "bob", server)


async def unlock(app: KluisApp, pilot: Pilot[Any]) -> None:
    app.screen.query_one("#passphrase", Input).value = PASSPHRASE
    await pilot.press("enter")
    await until(pilot, partial(is_online, app))


def sas(app: KluisApp) -> str:
    screen = app.screen
    if not isinstance(screen, VerifyScreen) or screen.code is None:
        return ""
    return screen.code.emoji_line() + " / " + screen.code.decimal_line()


def no_dialog(app: KluisApp) -> bool:
    return not isinstance(app.screen, VerifyScreen)


def marked(app: KluisApp, peer: str) -> bool:
    return (main(app).book.get(peer) or row0).verification == "verified"


def said(app: KluisApp, text: str) -> bool:
    return text in shown(app)


async def both_compare(
    alice: KluisApp, a: Pilot[Any], bob: KluisApp, b: Pilot[Any], alice_id: str, bob_id: str
) -> None:
    """Alice asks (F7 in her chat with Bob); Bob is told, and answers with F7 in his."""
    main(alice).open_conversation(bob_id)
    await a.press("f7")
    assert isinstance(alice.screen, VerifyScreen)
    told = lambda: any("asks to verify" in n.message for n in bob._notifications)  # noqa: E731
    await until(b, told, 20)
    main(bob).open_conversation(alice_id)
    await until(b, lambda: "asks to verify" in shown(bob))
    await b.press("f7")
    await until(a, lambda: sas(alice) != "", 20)
    await until(b, lambda: sas(bob) != "", 20)
    assert sas(alice) == sas(bob)  # the same emoji and numbers on both screens


async def test_two_apps_verify_each_other_and_both_show_the_mark(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice_id, bob_id, alice, bob = await two_apps_to_verify(server, tmp_path)
    async with alice.run_test(size=(80, 24)) as a, bob.run_test(size=(80, 24)) as b:
        await unlock(alice, a)
        await unlock(bob, b)
        await both_compare(alice, a, bob, b, alice_id, bob_id)
        await a.pause()
        await a.click("#match")
        state = alice.screen.query_one("#verify-state")
        await until(a, lambda: "waiting for them" in str(state.render()))
        await b.pause()
        await b.click("#match")
        for app, pilot, peer in ((alice, a, bob_id), (bob, b, alice_id)):
            await until(pilot, partial(no_dialog, app), 20)
            await until(pilot, partial(marked, app, peer))
            assert "✓ verified" in str(app.screen.query_one("#chat-title").render())
            assert "the codes matched" in shown(app)
            status = await app.backend_required.verification_status(peer)
            assert status == (Status.VERIFIED, "")


async def test_when_one_says_the_codes_differ_neither_shows_the_mark(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice_id, bob_id, alice, bob = await two_apps_to_verify(server, tmp_path)
    async with alice.run_test(size=(80, 24)) as a, bob.run_test(size=(80, 24)) as b:
        await unlock(alice, a)
        await unlock(bob, b)
        await both_compare(alice, a, bob, b, alice_id, bob_id)
        await a.click("#match")
        assert isinstance(bob.screen, VerifyScreen)
        bob.screen.query_one("#differ", Button).press()
        for app, pilot, peer in ((alice, a, bob_id), (bob, b, alice_id)):
            await until(pilot, partial(no_dialog, app), 20)
            await until(pilot, partial(said, app, "failed"))
            assert (main(app).book.get(peer) or row0).verification == ""
            assert "verified" not in str(app.screen.query_one("#chat-title").render())
            status = await app.backend_required.verification_status(peer)
            assert status[0] is Status.UNVERIFIED
