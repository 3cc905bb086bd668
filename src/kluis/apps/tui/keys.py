"""The app's key bindings: their defaults, and the user's keys from a TOML file.

Theory of operation: :data:`ACTIONS` is the one list of the app's remappable actions, with
their default keys and what they do; the screens' bindings carry these IDs, the help screen
is drawn from it, and Textual's keymap (``App.set_keymap``) swaps the keys at start. The
user's file maps an action to one key or several, comma-separated, in Textual's key names::

    # ~/.config/kluis/keys.toml (for every profile) or PROFILE/keys.toml (this one; wins)
    search = "ctrl+s"
    nickname = "f6,ctrl+o"

:func:`load_keymap` reads both files (the profile's entries over the general ones) and checks
everything before the app starts: the file parses, every action exists, every key is a key
Textual knows, no key serves two actions, no key takes one the app cannot do without
(:data:`RESERVED`: Enter sends, Tab moves, Escape closes, Ctrl+Q quits), and no action but the
help takes a key that types or edits text (the actions take their keys before the compose box
does: ``s`` for search would make the letter impossible to type). Anything else is a
:class:`~kluis.errors.BadConfig` naming the file and the entry: one line, no traceback.
"""

from __future__ import annotations

import os
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from textual.keys import Keys, _character_to_key

from kluis.errors import BadConfig

__all__ = [
    "ACTIONS",
    "KEYS_FILE",
    "MAX_KEYS_FILE_BYTES",
    "RESERVED",
    "Action",
    "check_key",
    "display_keys",
    "keymap_paths",
    "load_keymap",
]

KEYS_FILE = "keys.toml"
MAX_KEYS_FILE_BYTES = 64 * 1024
MAX_KEYS_PER_ACTION = 4


@dataclass(frozen=True, slots=True)
class Action:
    id: str  # the binding's ID (the keymap's key)
    keys: str  # the default, Textual key names, comma-separated
    description: str


ACTIONS: tuple[Action, ...] = (
    Action("new_conversation", "ctrl+n", "new conversation by ID"),
    Action("new_group", "ctrl+g", "new group"),
    Action("search", "ctrl+f", "search messages and conversations"),
    Action("members", "f2", "members of the open group"),
    Action("nickname", "f3", "nickname of the open peer"),
    Action("timer", "f4", "disappearing-message timer"),
    Action("attach", "ctrl+o", "send a file"),
    Action("save_file", "ctrl+s", "save a received file"),
    Action("show_id", "ctrl+y", "your ID and its QR code"),
    Action("show_images", "f5", "show images from unverified senders"),
    Action("next_profile", "f8", "next profile (--profile given twice)"),
    Action("select_previous", "ctrl+up", "choose an earlier"),
    Action("select_next", "ctrl+down", "later message"),
    Action("reply", "f6", "reply to it (else to the last)"),
    Action("verify", "f7", "verify the contact side by side"),
    Action("toggle_dark_theme", "ctrl+t", "light / dark theme"),
    Action("help", "question_mark", "this help (F1 too)"),
)
BY_ID = {a.id: a for a in ACTIONS}

# Keys nothing may take: Enter sends, Shift+Enter and Ctrl+J break a line, Tab moves between
# panes, Escape closes a dialog, Ctrl+Q quits, Ctrl+C copies, Ctrl+P opens the palette, F1
# opens the help whatever the keymap says (a way back to the keys).
RESERVED = frozenset(
    {"enter", "shift+enter", "ctrl+j", "tab", "shift+tab", "escape", "ctrl+q", "ctrl+c"}
    | {"ctrl+p", "f1"}
)
_EDITING = frozenset(
    {"backspace", "delete", "space", "up", "down", "left", "right", "home", "end"}
    | {"pageup", "pagedown", "insert"}
)
_MODIFIERS = ("ctrl", "shift", "alt", "meta", "super", "hyper")
_NAMED = {k.value for k in Keys if k.value.isidentifier()} | {
    _character_to_key(c) for c in string.printable if not c.isspace()
}


def check_key(key: str) -> str:
    """``key`` in Textual's form (``ctrl+shift+f5``, ``question_mark``, ``x``), lower case;
    ValueError if it is none."""
    key = key.strip().lower()
    *modifiers, name = key.split("+") if key else [""]
    if not name or (name not in _NAMED and not (len(name) == 1 and name.isprintable())):
        raise ValueError(f"unknown key {key!r}")
    if len(set(modifiers)) != len(modifiers) or any(m not in _MODIFIERS for m in modifiers):
        raise ValueError(f"bad modifiers in {key!r} (use {', '.join(_MODIFIERS)})")
    if name in (",", "+"):
        raise ValueError(f"write {name!r} by its name: {_character_to_key(name)}")
    return key


def types_text(key: str) -> bool:
    """Whether ``key`` (checked) types or edits text in the compose box: a character or an
    editing key, alone or with Shift. The app's actions (but the help) take their keys before
    the compose box does, so they may not use these."""
    *modifiers, name = key.split("+")
    if set(modifiers) - {"shift"}:
        return False
    return len(name) == 1 or _key_character(name) is not None or name in _EDITING


def display_keys(keys: str) -> str:
    """``ctrl+n,f2`` as ``Ctrl+N, F2``; ``question_mark`` as ``?``."""
    shown = []
    for key in keys.split(","):
        *modifiers, name = key.split("+")
        char = _key_character(name)
        label = char.upper() if char and len(char) == 1 and char.isalpha() else char or name
        if name.startswith("f") and name[1:].isdigit():
            label = name.upper()
        elif char is None:
            label = name.replace("_", " ").title()
        shown.append("+".join([*(m.title() for m in modifiers), label]))
    return ", ".join(shown)


def _key_character(name: str) -> str | None:
    if len(name) == 1:
        return name
    for c in string.printable:
        if not c.isspace() and _character_to_key(c) == name:
            return c
    return None


def keymap_paths(profile: Path, environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where keys are read from, weakest first: the user's config folder, then the profile's."""
    env = os.environ if environ is None else environ
    config = Path(env.get("XDG_CONFIG_HOME") or Path(env.get("HOME", "~")) / ".config")
    return [config.expanduser() / "kluis" / KEYS_FILE, profile / KEYS_FILE]


def _read(path: Path) -> dict[str, str]:
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_KEYS_FILE_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise BadConfig(f"{path}: cannot read ({exc.strerror})") from exc
    if len(raw) > MAX_KEYS_FILE_BYTES:
        raise BadConfig(f"{path}: over {MAX_KEYS_FILE_BYTES // 1024} KiB")
    try:
        data = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BadConfig(f"{path}: not TOML ({exc})") from exc
    out: dict[str, str] = {}
    for action, value in data.items():
        if action not in BY_ID:
            known = ", ".join(BY_ID)
            raise BadConfig(f"{path}: unknown action {action!r} (known: {known})")
        if not isinstance(value, str):
            raise BadConfig(f'{path}: {action} must be a string of keys, e.g. "ctrl+s"')
        keys = [k for k in value.split(",") if k.strip()]
        if not 1 <= len(keys) <= MAX_KEYS_PER_ACTION:
            raise BadConfig(f"{path}: {action} needs 1 to {MAX_KEYS_PER_ACTION} keys")
        try:
            checked = [check_key(k) for k in keys]
        except ValueError as exc:
            raise BadConfig(f"{path}: {action}: {exc}") from exc
        for key in checked:
            if key in RESERVED:
                raise BadConfig(f"{path}: {action}: {key} is reserved")
            if action != "help" and types_text(key):
                raise BadConfig(f"{path}: {action}: {key} types or edits text; add ctrl+ or alt+")
        out[action] = ",".join(dict.fromkeys(checked))
    return out


def load_keymap(paths: list[Path]) -> dict[str, str]:
    """The keymap from ``paths`` (later files win per action), checked; {} when none exists."""
    keymap: dict[str, str] = {}
    origin: dict[str, Path] = {}
    for path in paths:
        for name, keys in _read(path).items():
            keymap[name] = keys
            origin[name] = path
    users: dict[str, str] = {}
    for action in ACTIONS:
        for key in keymap.get(action.id, action.keys).split(","):
            if key in users and users[key] != action.id:
                where = origin.get(action.id) or origin.get(users[key])
                raise BadConfig(f"{where}: {key} is given to both {users[key]} and {action.id}")
            users[key] = action.id
    return keymap


_PAIRED = {"select_previous": "select_next"}  # shown on one row of the help: "A / B"


def active_keys(keymap: Mapping[str, str]) -> list[tuple[str, str]]:
    """(keys as shown, description) of every action, with the keymap applied; an action of
    :data:`_PAIRED` shares its row with its pair."""
    rows = []
    paired = set(_PAIRED.values())
    for a in ACTIONS:
        if a.id in paired:
            continue
        keys = display_keys(keymap.get(a.id, a.keys))
        description = a.description
        if a.id in _PAIRED:
            other = BY_ID[_PAIRED[a.id]]
            keys += " / " + display_keys(keymap.get(other.id, other.keys))
            description += " / " + other.description
        rows.append((keys, description))
    return rows
