"""The app against a real server process on loopback: first run, two app instances writing to
each other, a group, and the offline state with reconnection after a server restart."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from textual.pilot import Pilot
from textual.widgets import Input, OptionList

from kluis.apps.tui.app import KluisApp
from kluis.apps.tui.model import Conversation
from kluis.apps.tui.screens.dialogs import KeyChangeScreen, MembersScreen
from kluis.apps.tui.screens.files import SaveScreen
from kluis.apps.tui.screens.main import MainScreen
from kluis.apps.tui.screens.onboarding import IdScreen, UnlockScreen
from kluis.apps.tui.widgets import ChatLog, ComposeArea
from kluis.client.verification import Status, Verification
from kluis.crypto.profile_key import new_params
from tests.kluis_testing import PASSPHRASE, ServerProcess, link_device, reconnect, register
from tests.test_verification import both_verify

FAST_KDF = new_params(time_cost=1, memory_kib=8 * 1024)
row0 = Conversation("", "", False)  # stands for a row not there yet


def make_app(profile: Path, server: ServerProcess) -> KluisApp:
    return KluisApp(
        profile,
        cursor_blink=False,
        kdf=FAST_KDF,
        default_server=server.url,
        backoff_base=0.2,
        backoff_cap=1.0,
    )


async def until(pilot: Pilot[Any], check: Callable[[], bool], timeout: float = 15) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.05)


def main(app: KluisApp) -> MainScreen:
    screen = app.screen
    assert isinstance(screen, MainScreen), screen
    return screen


def is_online(app: KluisApp) -> bool:
    return isinstance(app.screen, MainScreen) and main(app).online is True


def shown(app: KluisApp) -> str:
    log = app.screen.query_one(ChatLog)
    return " ".join("".join(s.text for s in strip).strip() for strip in log.lines)


async def onboard(pilot: Pilot[Any], licence: str) -> None:
    app = pilot.app
    await pilot.pause()
    app.screen.query_one("#licence", Input).value = licence
    await pilot.press("tab", *"x", "enter")  # one character: weak, but accepted
    assert "weak" in str(app.screen.query_one("#strength").render())
    await pilot.press(*"y", "enter")  # a different second entry
    assert "differ" in str(app.screen.query_one("#error").render())
    app.screen.query_one("#passphrase", Input).value = ""
    app.screen.query_one("#passphrase2", Input).value = ""
    await pilot.press("enter")
    assert "empty passphrase" in str(app.screen.query_one("#error").render())
    app.screen.query_one("#passphrase", Input).value = PASSPHRASE
    app.screen.query_one("#passphrase2", Input).value = PASSPHRASE
    app.screen.query_one("#passphrase2", Input).focus()
    await pilot.press("enter")
    await until(pilot, lambda: isinstance(app.screen, IdScreen))


async def test_first_run_then_unlock_and_chat_between_two_apps(
    server: ServerProcess, tmp_path: Path
) -> None:
    bob_client = await register(server, tmp_path / "bob")
    bob_id = bob_client.account_id
    await bob_client.close()
    (licence,) = server.licences(1)

    alice = make_app(tmp_path / "alice", server)
    async with alice.run_test(size=(80, 24)) as pilot:
        await onboard(pilot, licence)
        id_screen = alice.screen
        assert isinstance(id_screen, IdScreen)
        alice_id = id_screen.account
        assert alice_id in str(id_screen.query_one("#id-text").render())
        assert "█" in str(id_screen.query_one("#qr").render())  # the QR code
        await pilot.press("enter")
        await until(pilot, lambda: main(alice).online is True)

    # later runs unlock; a wrong passphrase is refused
    alice = make_app(tmp_path / "alice", server)
    bob = make_app(tmp_path / "bob", server)
    async with alice.run_test(size=(80, 24)) as a, bob.run_test(size=(80, 24)) as b:
        for pilot in (a, b):
            assert isinstance(pilot.app.screen, UnlockScreen)
        await a.press(*"wrong", "enter")
        await until(a, lambda: "wrong passphrase" in str(alice.screen.query_one("#error").render()))
        for app, pilot in ((alice, a), (bob, b)):
            app.screen.query_one("#passphrase", Input).value = PASSPHRASE
            await pilot.press("enter")
        await until(a, lambda: isinstance(alice.screen, MainScreen) and main(alice).online is True)
        await until(b, lambda: isinstance(bob.screen, MainScreen) and main(bob).online is True)

        # alice opens a conversation with bob by ID and writes two lines
        await a.press("ctrl+n")
        alice.screen.query_one("#peer", Input).value = bob_id
        await a.press("enter")
        await a.press(*"hello", "ctrl+j", *"bob", "enter")
        await until(b, lambda: main(bob).book.get(alice_id) is not None)
        row = main(bob).book.get(alice_id)
        assert row is not None and row.unread == 1 and row.preview == "hello\nbob"
        main(bob).open_conversation(alice_id)
        await until(b, lambda: "hello" in shown(bob) and "bob" in shown(bob))
        bob.screen.query_one(ComposeArea).focus()
        await b.press(*"hi", "space", *"alice", "enter")
        await until(a, lambda: "hi alice" in shown(alice))

        # a group of the two: bob sees it and its members
        await a.press("ctrl+g", *"Walks", "enter")
        alice.screen.query_one("#members", Input).value = bob_id
        await a.press("enter")
        await until(a, lambda: main(alice).book.open_id not in (None, bob_id))
        group = main(alice).book.open_id or ""
        await a.press(*"to", "space", *"all", "enter")
        await until(b, lambda: (main(bob).book.get(group) or row).title == "Walks")
        main(bob).open_conversation(group)
        await until(b, lambda: "to all" in shown(bob))
        await b.press("f2")
        assert isinstance(bob.screen, MembersScreen)
        assert set(bob.screen.group.members) == {alice_id, bob_id}
        picture = bob.export_screenshot()
        assert alice_id in picture and bob_id in picture and "2&#160;members" in picture


async def test_offline_state_and_reconnection_after_a_server_restart(
    server: ServerProcess, tmp_path: Path
) -> None:
    peer = await register(server, tmp_path / "peer")
    me = await register(server, tmp_path / "me")
    peer_id = peer.account_id
    await peer.close()
    await me.close()
    app = make_app(tmp_path / "me", server)
    async with app.run_test(size=(80, 24)) as pilot:
        app.screen.query_one("#passphrase", Input).value = PASSPHRASE
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, MainScreen) and main(app).online is True)

        await asyncio.to_thread(server.kill)  # the server goes away at once
        await until(pilot, lambda: main(app).online is False)
        status = str(app.screen.query_one("#status").render())
        assert "offline" in status and "reconnecting in" in status
        # sending while offline keeps the message in the outbox, and says so
        main(app).open_conversation(peer_id)
        app.screen.query_one(ComposeArea).focus()
        await pilot.press(*"later", "enter")
        await until(pilot, lambda: "outbox" in " ".join(n.message for n in app._notifications))
        assert app.screen.query_one(ComposeArea).text == ""

        await asyncio.to_thread(server.start)  # same port, same data
        await until(pilot, lambda: main(app).online is True, timeout=20)
        await until(pilot, lambda: "later" in shown(app))  # sent from the outbox, shown

        # and it receives again; the peer got the message of the outbox, once
        peer = await reconnect(server, tmp_path / "peer")
        await peer.send(app.backend_required.account_id, "welcome back")
        await until(pilot, lambda: "welcome back" in shown(app))
        assert [m.text for m in await peer.receive()] == ["later"]
    await peer.close()


async def test_a_key_change_after_verification_is_warned_and_nothing_is_sent(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice_c = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    bob2 = await link_device(bob, server, tmp_path / "bob2")
    results, _, _ = await both_verify(alice_c, bob2)  # Alice verifies Bob's second device
    assert all(isinstance(r, Verification) for r in results), results
    assert alice_c.verification_status(bob.account_id) == (Status.VERIFIED, "")
    await alice_c.send(bob.account_id, "verified hello")
    await bob.receive(wait=5, until=1)
    bob_id = bob.account_id
    await bob.revoke(bob2.core.device_id)  # Bob drops the device Alice verified
    for client in (bob2, alice_c):
        await client.close()

    alice = make_app(tmp_path / "alice", server)
    async with alice.run_test(size=(80, 24)) as pilot:
        alice.screen.query_one("#passphrase", Input).value = PASSPHRASE
        await pilot.press("enter")
        await until(
            pilot, lambda: isinstance(alice.screen, MainScreen) and main(alice).online is True
        )
        screen = main(alice)
        screen.open_conversation(bob_id)
        await until(pilot, lambda: (screen.book.get(bob_id) or row0).verification != "")
        screen.query_one(ComposeArea).focus()
        await pilot.press(*"are", "space", *"you", "space", *"there", "enter")
        await until(pilot, lambda: isinstance(alice.screen, KeyChangeScreen))
        warning = alice.screen
        assert isinstance(warning, KeyChangeScreen)
        assert warning.warning.account == bob_id and warning.warning.kind == "broken"
        assert "revoked" in warning.warning.detail
        picture = alice.export_screenshot()
        assert bob_id in picture and "kluis&#160;verify" in picture
        compose = screen.query_one(ComposeArea)
        assert compose.text == "are you there" and compose.read_only  # kept, and locked
        assert (screen.book.get(bob_id) or row0).verification == "broken"
        await pilot.press("escape")
        assert alice.screen is warning  # Escape does not dismiss it
        await pilot.press("enter")  # "I understand"
        await until(pilot, lambda: alice.screen is screen)
        assert not compose.read_only and compose.text == "are you there"
        # still blocked until a fresh SAS: Enter shows the warning again, nothing goes out
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(alice.screen, KeyChangeScreen))
        await pilot.press("enter")
        await until(pilot, lambda: alice.screen is screen)
        assert compose.text == "are you there"
        assert "are you there" not in shown(alice)
        history = await alice.backend_required.history(bob_id)
        assert [m.text for m in history] == ["verified hello"]

    got = await bob.receive(wait=2)
    assert "are you there" not in [m.text for m in got + bob.history(alice_c.account_id)]
    await bob.close()


async def test_nickname_timer_read_receipts_and_a_file_between_two_apps(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice_client = await register(server, tmp_path / "alice")
    bob_client = await register(server, tmp_path / "bob")
    alice_id, bob_id = alice_client.account_id, bob_client.account_id
    await alice_client.close()
    await bob_client.close()
    alice = make_app(tmp_path / "alice", server)
    bob = make_app(tmp_path / "bob", server)
    async with alice.run_test(size=(80, 24)) as a, bob.run_test(size=(80, 24)) as b:
        for app, pilot in ((alice, a), (bob, b)):
            app.screen.query_one("#passphrase", Input).value = PASSPHRASE
            await pilot.press("enter")
        for app, pilot in ((alice, a), (bob, b)):
            await until(pilot, partial(is_online, app))

        # alice names bob (F3): the name is in her list and kept in her profile
        main(alice).open_conversation(bob_id)
        await a.press("f3", *"Bob", "enter")
        await until(a, lambda: (main(alice).book.get(bob_id) or row0).title == "Bob")
        assert await alice.backend_required.contacts() == {bob_id: "Bob"}

        # alice writes; once bob has the conversation open, her message shows read (✓✓)
        alice.screen.query_one(ComposeArea).focus()
        await a.press(*"hello", "enter")
        await until(b, lambda: main(bob).book.get(alice_id) is not None)
        main(bob).open_conversation(alice_id)
        await until(b, lambda: "hello" in shown(bob))
        await until(a, lambda: "you ✓✓" in shown(alice))

        # alice sets the timer (F4, 5 min): both lists mark it, bob sees the system line
        await a.press("f4", "down", "enter")
        await until(a, lambda: (main(alice).book.get(bob_id) or row0).timer == 300)
        await until(b, lambda: (main(bob).book.get(alice_id) or row0).timer == 300)
        await until(b, lambda: "disappearing messages: 5 min" in shown(bob))
        assert await bob.backend_required.timers() == {alice_id: 300}

        # a file: alice sends it (Ctrl+O), bob saves it (Ctrl+S), byte for byte
        document = tmp_path / "notes.txt"
        document.write_bytes(b"kluis file\n" * 5000)  # 55 KB: more than one piece
        await a.press("ctrl+o")
        alice.screen.query_one("#path", Input).value = str(document)
        alice.screen.query_one("#caption", Input).focus()
        await a.press(*"notes", "enter")
        await until(a, lambda: "[file] notes.txt" in shown(alice))
        await until(b, lambda: "[file] notes.txt" in shown(bob))
        await b.press("ctrl+s")
        await until(b, lambda: isinstance(bob.screen, SaveScreen))
        bob.screen.query_one("#folder", Input).value = str(tmp_path / "saved")
        bob.screen.query_one("#files", OptionList).focus()
        await b.press("enter")
        saved = tmp_path / "saved" / "notes.txt"
        await until(b, lambda: saved.exists())
        assert saved.read_bytes() == document.read_bytes()
