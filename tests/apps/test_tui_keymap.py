"""Configurable keys: keys.toml in ~/.config/kluis/ and in the profile, checked before the app
starts, applied by Textual's keymap, and shown by the help screen."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from textual.command import CommandPalette

from kluis.apps.tui.app import KluisApp as _App
from kluis.apps.tui.keys import (
    MAX_KEYS_FILE_BYTES,
    check_key,
    display_keys,
    keymap_paths,
    load_keymap,
)
from kluis.apps.tui.screens.contact import NicknameScreen
from kluis.apps.tui.screens.dialogs import HelpScreen
from kluis.apps.tui.screens.main import MainScreen
from kluis.errors import BadConfig
from tests.apps.tui_fakes import ANNA, NOW, FakeBackend, wait_workers


def test_profile_keys_win_over_the_config_folder(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path / "home")}
    profile = tmp_path / "profile"
    general, own = keymap_paths(profile, env)
    assert general == tmp_path / "home" / ".config" / "kluis" / "keys.toml"
    assert own == profile / "keys.toml"
    assert keymap_paths(profile, {"XDG_CONFIG_HOME": "/cfg"})[0] == Path("/cfg/kluis/keys.toml")
    assert load_keymap([general, own]) == {}  # no file: the defaults
    general.parent.mkdir(parents=True)
    profile.mkdir()
    general.write_text('search = "ctrl+b"\nnickname = "f9"\n')
    own.write_text('# mine\nnickname = "F10, ctrl+r"\n')
    assert load_keymap([general, own]) == {"search": "ctrl+b", "nickname": "f10,ctrl+r"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("search = ", "not TOML"),
        ('serach = "ctrl+b"', "unknown action 'serach'"),
        ("search = 5", "must be a string of keys"),
        ('search = "ctrl+nosuchkey"', "unknown key 'ctrl+nosuchkey'"),
        ('search = "cmd+s"', "bad modifiers"),
        ('search = ""', "1 to 4 keys"),
        ('search = "enter"', "enter is reserved"),
        ('search = "ctrl+q"', "ctrl+q is reserved"),
        ('search = "s"', "s types or edits text"),
        ('search = "shift+backspace"', "shift+backspace types or edits text"),
        ('search = "ctrl+n"', "ctrl+n is given to both new_conversation and search"),
        ('search = "f9"\nnickname = "f9"', "f9 is given to both search and nickname"),
        ("x" * (MAX_KEYS_FILE_BYTES + 1), "over 64 KiB"),
    ],
)
def test_a_bad_keys_file_is_refused_naming_the_file(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(content)
    with pytest.raises(BadConfig) as caught:
        load_keymap([path])
    assert caught.value.code == "bad_config"
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_key_names_and_how_they_are_shown() -> None:
    assert check_key(" Ctrl+Shift+F5 ") == "ctrl+shift+f5"
    assert check_key("question_mark") == "question_mark" and check_key("x") == "x"
    for bad in ("", "ctrl+", "ctrl+ctrl+a", "banana"):
        with pytest.raises(ValueError):
            check_key(bad)
    assert display_keys("ctrl+n,f2") == "Ctrl+N, F2"
    assert display_keys("question_mark") == "?"
    assert display_keys("alt+pagedown") == "Alt+Pagedown"


async def test_the_keymap_is_applied_and_the_help_shows_it(tmp_path: Path) -> None:
    app = _App(
        tmp_path / "profile",
        backend=FakeBackend(),
        clock=lambda: NOW,
        cursor_blink=False,
        keymap={"search": "ctrl+b", "nickname": "f9"},
    )
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await wait_workers(app)
        screen = app.screen
        assert isinstance(screen, MainScreen)
        screen.open_conversation(ANNA)
        await wait_workers(app)
        await pilot.press("ctrl+f")  # no longer search
        assert app.screen is screen
        await pilot.press("ctrl+b")
        assert isinstance(app.screen, CommandPalette)
        await pilot.press("escape")
        await pilot.press("f3")  # no longer the nickname
        assert app.screen is screen
        await pilot.press("f9")
        assert isinstance(app.screen, NicknameScreen)
        await pilot.press("escape", "f1")
        assert isinstance(app.screen, HelpScreen)
        shown = app.export_screenshot()
        assert "Ctrl+B" in shown and "F6" in shown and "Ctrl+F" not in shown
        assert "keys.toml" in shown


def test_kluis_chat_refuses_a_bad_keys_file_in_one_line(tmp_path: Path) -> None:
    profile = tmp_path / "profile"
    profile.mkdir()
    (profile / "keys.toml").write_text('search = "enter"\n')
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    proc = subprocess.run(
        [sys.executable, "-m", "kluis.apps.cli", "chat", "--profile", str(profile)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "bad_config" in proc.stderr and "enter is reserved" in proc.stderr
