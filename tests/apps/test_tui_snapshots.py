"""Snapshots of the main screens in dark and light themes (pytest-textual-snapshot; update with
``pytest --snapshot-update``), and the screenshots in docs/screenshots/ that README shows.

The clock is fixed, the time zone is UTC and the cursor does not blink, so every run draws
the same screens.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot

from kluis.apps.tui.app import KluisApp
from kluis.apps.tui.screens.dialogs import HelpScreen
from kluis.apps.tui.screens.onboarding import IdScreen
from kluis.client.records import Message
from tests.apps.tui_fakes import (
    ANNA,
    DEMO_NICKNAMES,
    DEMO_TIMERS,
    ME,
    NASTY,
    NOW,
    FakeBackend,
    fake_app,
    sample_history,
)

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
Compare = Callable[..., bool]


def first_run_app(tmp: Path, theme: str = "textual-dark") -> KluisApp:
    return KluisApp(tmp / "new-profile", cursor_blink=False, clock=lambda: NOW, theme=theme)


async def settle(pilot: Pilot[Any]) -> None:
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def open_anna(pilot: Pilot[Any]) -> None:
    await settle(pilot)
    pilot.app.screen.open_conversation(ANNA)  # type: ignore[attr-defined]
    await settle(pilot)


async def show_id(pilot: Pilot[Any]) -> None:
    await settle(pilot)
    await pilot.app.push_screen(IdScreen(ME))
    await pilot.pause()


async def show_help(pilot: Pilot[Any]) -> None:
    await settle(pilot)
    await pilot.app.push_screen(HelpScreen())
    await pilot.pause()


def demo(messages: list[Message] | None = None) -> FakeBackend:
    return FakeBackend(messages, nicknames=DEMO_NICKNAMES, timers=DEMO_TIMERS)


async def search_agenda(pilot: Pilot[Any]) -> None:
    await open_anna(pilot)
    await pilot.press("ctrl+f", *"you")
    await pilot.pause(0.5)  # the palette searches as it is typed
    await settle(pilot)


def with_hostile(tmp: Path, theme: str = "textual-dark") -> KluisApp:
    history = [*sample_history(), Message(ANNA, ANNA, NOW, NASTY)]
    return fake_app(tmp, demo(history), theme=theme)


@pytest.mark.parametrize("theme", ["textual-dark", "textual-light"])
def test_main_screen(snap_compare: Compare, tmp_path: Path, theme: str) -> None:
    assert snap_compare(with_hostile(tmp_path, theme), run_before=open_anna)


@pytest.mark.parametrize("theme", ["textual-dark", "textual-light"])
def test_group_chat(snap_compare: Compare, tmp_path: Path, theme: str) -> None:
    assert snap_compare(fake_app(tmp_path, demo(), theme=theme), run_before=settle)


@pytest.mark.parametrize("theme", ["textual-dark", "textual-light"])
def test_first_run(snap_compare: Compare, tmp_path: Path, theme: str) -> None:
    assert snap_compare(first_run_app(tmp_path, theme), run_before=settle)


@pytest.mark.parametrize("theme", ["textual-dark", "textual-light"])
def test_new_id_with_qr_code(snap_compare: Compare, tmp_path: Path, theme: str) -> None:
    assert snap_compare(fake_app(tmp_path, theme=theme), run_before=show_id)


def test_help(snap_compare: Compare, tmp_path: Path) -> None:
    assert snap_compare(fake_app(tmp_path), run_before=show_help)


# ---- the screenshots README shows ---------------------------------------------------------------


def to_png(svg: str, png: Path) -> None:
    """Render the SVG with a monospace font this machine has (Textual names Fira Code, which
    the converter cannot fetch)."""
    cairosvg = pytest.importorskip("cairosvg", reason="cairosvg (and libcairo) not installed")
    svg = svg.replace(
        "font-family: Fira Code, monospace;", "font-family: DejaVu Sans Mono, monospace;"
    )
    try:
        cairosvg.svg2png(bytestring=svg.encode(), write_to=str(png))
    except OSError as exc:  # no libcairo on this machine
        pytest.skip(f"cairosvg cannot render: {exc}")


def save(name: str, svg: str) -> None:
    """Write ``name``.svg and .png into docs/screenshots/ when the picture changed."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    target = SHOTS / f"{name}.svg"
    stable = re.sub(r"terminal-\d+", "terminal", svg)
    if target.exists() and target.read_text() == stable and (SHOTS / f"{name}.png").exists():
        return
    target.write_text(stable)
    to_png(stable, SHOTS / f"{name}.png")


SCREENS: list[tuple[str, Callable[[Path], KluisApp], Callable[[Pilot[Any]], Any]]] = [
    ("chat-dark", lambda tmp: with_hostile(tmp), open_anna),
    ("chat-light", lambda tmp: with_hostile(tmp, "textual-light"), open_anna),
    ("group-dark", lambda tmp: fake_app(tmp, demo()), settle),
    ("first-run-dark", lambda tmp: first_run_app(tmp), settle),
    ("your-id-dark", lambda tmp: fake_app(tmp), show_id),
    ("search-dark", lambda tmp: fake_app(tmp, demo()), search_agenda),
]


@pytest.mark.parametrize(("name", "make", "before"), SCREENS, ids=[s[0] for s in SCREENS])
async def test_screenshots_for_readme(
    tmp_path: Path,
    name: str,
    make: Callable[[Path], KluisApp],
    before: Callable[[Pilot[Any]], Any],
) -> None:
    app = make(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await before(pilot)
        svg = app.export_screenshot(title=f"kluis chat: {name}")
    assert "<svg" in svg
    save(name, svg)
    assert (SHOTS / f"{name}.svg").exists()
