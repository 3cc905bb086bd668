"""Snapshots of the main screens in dark and light themes (pytest-textual-snapshot; update with
``pytest --snapshot-update``), and the screenshots in docs/screenshots/ that README shows.

The clock is fixed, the time zone is UTC and the cursor does not blink, so every run draws
the same screens.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw
from textual.pilot import Pilot

from kluis.apps.tui.app import KluisApp
from kluis.apps.tui.screens.dialogs import HelpScreen
from kluis.apps.tui.screens.onboarding import IdScreen
from kluis.client.events import MessageReceived
from kluis.client.records import Message
from kluis.client.verification import Status
from tests.apps.test_tui_images import image_ref
from tests.apps.test_tui_profiles import two_profiles
from tests.apps.tui_fakes import (
    ANNA,
    BRAM,
    DEMO_NICKNAMES,
    DEMO_TIMERS,
    ME,
    NASTY,
    NOW,
    FakeBackend,
    fake_app,
    sample_history,
    wait_workers,
)

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
Compare = Callable[..., bool]


def first_run_app(tmp: Path, theme: str = "textual-dark") -> KluisApp:
    return KluisApp(tmp / "new-profile", cursor_blink=False, clock=lambda: NOW, theme=theme)


async def settle(pilot: Pilot[Any]) -> None:
    await wait_workers(pilot.app)
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


def picture() -> bytes:
    """A deterministic picture: a colour gradient with a disc."""
    red = Image.linear_gradient("L").resize((96, 64))
    green = Image.linear_gradient("L").rotate(90).resize((96, 64))
    image = Image.merge("RGB", (red, green, Image.new("L", (96, 64), 150)))
    ImageDraw.Draw(image).ellipse((30, 14, 66, 50), fill=(250, 220, 40))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def with_images(tmp: Path, theme: str = "textual-dark") -> KluisApp:
    """Anna (verified) sends a picture and a broken one; Bram's waits for F5."""
    backend = demo([])
    backend.statuses[ANNA] = (Status.VERIFIED, "")
    good = picture()
    for sender, data, name, text in (
        (ANNA, good, "sunset.png", "From the dunes"),
        (ANNA, good[:200], "cut.png", ""),
    ):
        ref = image_ref(data, name)
        backend.blobs[ref.id] = data
        backend.messages.append(Message(sender, ANNA, NOW, text, attachment=ref))
    return fake_app(tmp, backend, theme=theme)


async def open_images(pilot: Pilot[Any]) -> None:
    await open_anna(pilot)
    await settle(pilot)
    await settle(pilot)


def with_profiles(tmp: Path, theme: str = "textual-dark") -> KluisApp:
    app, _, _ = two_profiles(tmp, theme)
    return app


async def message_to_work(pilot: Pilot[Any]) -> None:
    await settle(pilot)
    await pilot.press("f8")
    await settle(pilot)
    await pilot.press("f8")
    await settle(pilot)
    work = pilot.app.profiles[1]  # type: ignore[attr-defined]
    backend = pilot.app.backends[work]  # type: ignore[attr-defined]
    backend.emit(MessageReceived(Message(BRAM, BRAM, NOW, "Stand-up moved to 10:00")))
    backend.emit(MessageReceived(Message(ANNA, ANNA, NOW, "Invoice attached")))
    await settle(pilot)
    pilot.app.screen.open_conversation(ANNA)  # type: ignore[attr-defined]
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


@pytest.mark.parametrize("theme", ["textual-dark", "textual-light"])
def test_image_previews(snap_compare: Compare, tmp_path: Path, theme: str) -> None:
    assert snap_compare(with_images(tmp_path, theme), run_before=open_images)


@pytest.mark.parametrize("theme", ["textual-dark", "textual-light"])
def test_two_profiles(snap_compare: Compare, tmp_path: Path, theme: str) -> None:
    assert snap_compare(with_profiles(tmp_path, theme), run_before=message_to_work)


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
    ("images-dark", lambda tmp: with_images(tmp), open_images),
    ("profiles-dark", lambda tmp: with_profiles(tmp), message_to_work),
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
