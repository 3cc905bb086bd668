"""The app attached to a real `kluis daemon`: no passphrase, messages both ways, files with
progress, and the daemon's notification only while no app is open; and the app alone keeps a
daemon off its profile."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from textual.widgets import Input

from kluis.apps.tui.app import KluisApp
from kluis.apps.tui.remote import DaemonBackend
from kluis.apps.tui.screens.main import MainScreen
from kluis.apps.tui.screens.onboarding import UnlockScreen
from kluis.client.records import Message
from kluis.errors import TransportError
from tests.apps.test_tui_server import main, shown, until
from tests.integration.test_cli import kluis, lines
from tests.integration.test_daemon import DaemonProcess
from tests.integration.test_daemon_app import two  # noqa: F401 (a fixture)


def fake_notify_send(tmp_path: Path) -> tuple[str, Path]:
    """A PATH whose notify-send records that it ran, and the file it writes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    notified = tmp_path / "notified"
    (bin_dir / "notify-send").write_text(f'#!/bin/sh\necho "$@" >> {notified}\n')
    (bin_dir / "notify-send").chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}", notified


def noop(done: int, total: int) -> None:
    pass


async def inbox(profile: Path) -> list[tuple[str, str, str]]:
    result = await asyncio.to_thread(kluis, "inbox", "--profile", str(profile), "--wait", "5")
    return lines(result.stdout)


async def test_the_app_attaches_to_the_daemon_and_chats_through_it(
    two: tuple[Path, str, Path, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    a, alice, b, bob = two
    path, notified = fake_notify_send(tmp_path)
    daemon = DaemonProcess(a, "--lock-after", "60", env={"PATH": path})
    try:
        await asyncio.to_thread(daemon.wait_ready)
        app = KluisApp(a, cursor_blink=False, backoff_base=0.2, backoff_cap=1.0)
        async with app.run_test(size=(100, 24)) as pilot:
            # no passphrase typed: the app attaches to the daemon and shows the chats
            await until(
                pilot, lambda: isinstance(app.screen, MainScreen) and main(app).online is True
            )
            backend = app.backend_required
            assert isinstance(backend, DaemonBackend) and backend.account_id == alice
            assert "via daemon" in str(app.screen.query_one("#status").render())

            await pilot.press("ctrl+n")
            app.screen.query_one("#peer", Input).value = bob
            await pilot.press("enter")
            await pilot.press(*"hello", "space", *"bob", "enter")
            assert [(s, t) for s, _, t in await inbox(b)] == [(alice, "hello bob")]

            # bob answers: the daemon receives it and the app shows it (its events)
            await asyncio.to_thread(kluis, "send", "--profile", str(b), alice, "hi alice")
            await until(pilot, lambda: "hi alice" in shown(app))
            await asyncio.sleep(1.0)
            assert not notified.exists()  # an app is open: the daemon does not notify

            # a file, with progress, through the daemon; a preview and a saved copy
            data = os.urandom(300_000)
            (tmp_path / "photo.bin").write_bytes(data)
            seen: list[tuple[int, int]] = []
            sent = await backend.send_file(
                bob, tmp_path / "photo.bin", "look", lambda done, total: seen.append((done, total))
            )
            assert isinstance(sent, Message) and sent.attachment is not None
            assert sent.text == "look" and seen and seen[-1] == (len(data), len(data))
            assert await backend.attachment_bytes(sent.attachment, len(data)) == data
            saved = await backend.save_file(sent.attachment, tmp_path / "saved", noop)
            assert saved.read_bytes() == data and saved.parent == tmp_path / "saved"
            assert "look" in [t for _, _, t in await inbox(b)][-1]
        # the app closed its connection only
        assert daemon.proc.poll() is None
        await asyncio.to_thread(kluis, "send", "--profile", str(b), alice, "while away")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not notified.exists() and loop.time() < deadline:
            await asyncio.sleep(0.1)
        assert notified.read_text().strip() == "Kluis new message"
        # and a command still goes through it (no passphrase)
        sent_cli = await asyncio.to_thread(
            kluis, "send", "--profile", str(a), bob, "from the cli", passphrase=None
        )
        assert sent_cli.stdout.strip() == f"sent to {bob}"
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.log.read_text()


async def test_a_daemon_that_does_not_answer_is_named_on_the_unlock_screen(
    two: tuple[Path, str, Path, str],  # noqa: F811
) -> None:
    a = two[0]
    daemon = DaemonProcess(a, "--lock-after", "60")
    try:
        await asyncio.to_thread(daemon.wait_ready)
        (a / "daemon.sock").unlink()  # the daemon holds the lock but nothing answers
        app = KluisApp(a, cursor_blink=False)
        async with app.run_test(size=(100, 24)) as pilot:
            screen = app.screen
            assert isinstance(screen, UnlockScreen)
            error = screen.query_one("#error")
            await until(pilot, lambda: "does not answer" in str(error.render()))
            text = str(error.render())
            assert f"pid {daemon.proc.pid}" in text and f"kill {daemon.proc.pid}" in text
            assert app.backend is None
    finally:
        daemon.stop()


async def test_with_the_app_open_alone_a_daemon_is_refused(
    two: tuple[Path, str, Path, str],  # noqa: F811
) -> None:
    a = two[0]
    app = KluisApp(a, cursor_blink=False, backoff_base=0.2, backoff_cap=1.0)
    async with app.run_test(size=(100, 24)) as pilot:
        assert isinstance(app.screen, UnlockScreen)
        app.screen.query_one("#passphrase", Input).value = "pw-cli"
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, MainScreen) and main(app).online is True)
        assert "via daemon" not in str(app.screen.query_one("#status").render())
        refused = await asyncio.to_thread(kluis, "daemon", "--profile", str(a), check=False)
        assert refused.returncode == 1 and "in use" in refused.stderr, refused.stderr
        assert "kluis chat" in refused.stderr and "Traceback" not in refused.stderr
    # the app closed the profile and let the lock go: a daemon takes it now
    daemon = DaemonProcess(a, "--lock-after", "60")
    try:
        await asyncio.to_thread(daemon.wait_ready)
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.log.read_text()


async def test_two_profiles_one_through_the_daemon_one_alone(
    two: tuple[Path, str, Path, str],  # noqa: F811
) -> None:
    a, alice, b, bob = two
    daemon = DaemonProcess(a, "--lock-after", "60")
    try:
        await asyncio.to_thread(daemon.wait_ready)
        app = KluisApp(b, more_profiles=[a], cursor_blink=False, backoff_base=0.2)
        async with app.run_test(size=(100, 24)) as pilot:
            assert isinstance(app.screen, UnlockScreen)  # bob: alone, with his passphrase
            app.screen.query_one("#passphrase", Input).value = "pw-cli"
            await pilot.press("enter")
            await until(
                pilot, lambda: isinstance(app.screen, MainScreen) and main(app).online is True
            )
            assert main(app).backend.account_id == bob
            await pilot.press("f8")  # alice: the daemon holds her profile; no passphrase
            await until(
                pilot,
                lambda: (
                    isinstance(app.screen, MainScreen)
                    and main(app).backend.account_id == alice
                    and main(app).online is True
                ),
            )
            assert "via daemon" in str(app.screen.query_one("#status").render())
            assert isinstance(app.backends[a], DaemonBackend)
            assert not isinstance(app.backends[b], DaemonBackend)
            # bob's profile is open alone in the app: no daemon may take it meanwhile
            refused = await asyncio.to_thread(kluis, "daemon", "--profile", str(b), check=False)
            assert refused.returncode == 1 and "in use" in refused.stderr
            await app.backends[b].send(alice, "from bob's tab")
            await until(pilot, lambda: main(app).book.get(bob) is not None)
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.log.read_text()


async def test_the_app_follows_the_daemon_going_and_coming_back(
    two: tuple[Path, str, Path, str],  # noqa: F811
) -> None:
    a, alice, b, _ = two
    daemon = DaemonProcess(a, "--lock-after", "60")
    try:
        await asyncio.to_thread(daemon.wait_ready)
        app = KluisApp(a, cursor_blink=False)
        async with app.run_test(size=(100, 24)) as pilot:
            await until(
                pilot, lambda: isinstance(app.screen, MainScreen) and main(app).online is True
            )
            backend = app.backend_required
            await asyncio.to_thread(daemon.stop)
            await until(pilot, lambda: main(app).online is False)
            assert "daemon stopped" in str(app.screen.query_one("#status").render())
            with pytest.raises(TransportError):
                await backend.contacts()
            # sent while no daemon runs: the next daemon receives it before the app is back
            await asyncio.to_thread(kluis, "send", "--profile", str(b), alice, "while away")
            daemon = DaemonProcess(a, "--lock-after", "60")  # started again (passphrase given)
            await asyncio.to_thread(daemon.wait_ready)
            await until(pilot, lambda: main(app).online is True, timeout=20)

            # no event brought it to the app: the catch-up after the reattach did, counted once
            def bobs() -> tuple[str, int]:
                row = main(app).book.get(two[3])
                return ("", 0) if row is None else (row.preview, row.unread)

            await until(pilot, lambda: bobs()[0] == "while away")
            assert bobs() == ("while away", 1)
            assert await backend.contacts() == {}
            await asyncio.to_thread(kluis, "send", "--profile", str(b), alice, "back again")
            main(app).open_conversation(two[3])
            await until(pilot, lambda: "back again" in shown(app))
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.log.read_text()
