"""Kitty and sixel previews through textual-image: the mode (``KLUIS_IMAGES`` or the
terminal's answer, asked only before the app runs), the escape sequences drawn from the pixels
we decoded, and the limits holding before any renderer runs.

The protocols are checked at the renderable level (rendered with a Rich console; textual-image's
kitty upload is written to ``sys.__stdout__``, replaced here by a buffer) and in the headless
app's chat log (its lines' segments): no real kitty or sixel terminal runs in the tests.
"""

from __future__ import annotations

import base64
import io
import os
import re
import select
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, PngImagePlugin
from rich.console import Console, RenderableType
from rich.segment import Segment

from kluis.apps.tui import graphics, images
from kluis.apps.tui.graphics import ENV, Mode, detect, mode_from_env
from kluis.apps.tui.images import MAX_IMAGE_BYTES, render_preview
from kluis.apps.tui.screens.main import MainScreen
from kluis.apps.tui.widgets import ChatLog
from kluis.client.records import Message
from kluis.client.verification import Status
from kluis.errors import BadImage
from tests.apps.test_tui_images import bomb_png, image_ref, png, settle, shown
from tests.apps.tui_fakes import ANNA, NOW, FakeBackend, fake_app

RED = (200, 10, 10)
APC = re.compile(r"\x1b_G([^;\x1b]*)(?:;([A-Za-z0-9+/=]*))?\x1b\\")
SIXEL = re.compile(r'\x1bP[0-9;]*q"1;1;(\d+);(\d+)([0-9;#!$?-~-]*)\x1b\\')
HOSTILE = "\x1b_Ga=d\x1b\\\x1bP0;0q#0;2;0;0;0evil\x1b\\\x1b]52;c;ZXZpbA==\x07"


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


TTY, PIPE = _Stream(True), _Stream(False)


@pytest.fixture(autouse=True)
def terminal_out(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """What textual-image writes to the terminal (its kitty uploads), and a stdout that is no
    terminal: its import here never queries the one pytest may run in."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "__stdout__", out)
    yield out


def rendered(renderable: RenderableType) -> list[Segment]:
    console = Console(
        file=io.StringIO(), width=100, height=40, force_terminal=True, color_system="truecolor"
    )
    return list(console.render(renderable, console.options))


def kitty_messages(out: str) -> list[tuple[dict[str, str], str]]:
    """``out`` as kitty graphics commands (keys, payload); nothing else may be in it."""
    messages, position = [], 0
    for match in APC.finditer(out):
        assert match.start() == position, f"not kitty graphics: {out[position : match.start()]!r}"
        keys = dict(pair.split("=", 1) for pair in match[1].split(","))
        messages.append((keys, match[2] or ""))
        position = match.end()
    assert position == len(out), f"not kitty graphics: {out[position:]!r}"
    return messages


def kitty_png(messages: list[tuple[dict[str, str], str]]) -> tuple[bytes, Image.Image]:
    data = base64.b64decode("".join(payload for keys, payload in messages if keys.get("f")))
    return data, Image.open(io.BytesIO(data), formats=["PNG"])


def hostile_png(size: tuple[int, int] = (64, 48)) -> bytes:
    """A red PNG whose text chunk holds escape sequences and whose ICC profile is made up."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", HOSTILE)
    out = io.BytesIO()
    Image.new("RGB", size, RED).save(out, "PNG", pnginfo=info, icc_profile=b"EVILPROFILE" * 20)
    return out.getvalue()


# ---- the protocols ------------------------------------------------------------------------------


def test_kitty_uploads_the_decoded_pixels_as_a_png_and_draws_placeholders(
    terminal_out: io.StringIO,
) -> None:
    preview = render_preview(png((64, 48), RED), mode=Mode.KITTY)
    assert preview.graphic is not None and preview.renderable is preview.graphic
    text = "".join(segment.text for segment in rendered(preview.renderable))
    assert "\x1b" not in text  # placeholders: text the terminal replaces with the image
    lines = text.rstrip("\n").split("\n")
    assert [line.count(chr(0x10EEEE)) for line in lines] == [7, 7, 7]  # 64x48 px in 10x20 cells
    messages = kitty_messages(terminal_out.getvalue())
    assert any(
        keys.get("a") == "p" and (keys["c"], keys["r"]) == ("7", "3") for keys, _ in messages
    )
    data, image = kitty_png(messages)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert image.size == (70, 60) and image.convert("RGB").getpixel((35, 30)) == RED


def test_sixel_draws_a_dcs_sequence_of_the_decoded_pixels(terminal_out: io.StringIO) -> None:
    preview = render_preview(png((64, 48), RED), mode=Mode.SIXEL)
    assert preview.graphic is not None
    text = "".join(segment.text for segment in rendered(preview.renderable))
    (match,) = SIXEL.finditer(text)
    assert (match[1], match[2]) == ("70", "60")
    assert "#0;2;78;4;4" in match[3]  # colour register 0: 200, 10, 10 in percent
    assert terminal_out.getvalue() == ""  # sixel writes nothing beside the render


def test_halfblock_from_the_environment_draws_what_it_drew_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV, "halfblock")
    mode = detect(os.environ, TTY, TTY)
    assert mode is Mode.HALFBLOCK
    data = png((64, 48), RED)
    preview, before = render_preview(data, mode=mode), render_preview(data)
    assert preview.graphic is None and preview.renderable is preview.text
    assert preview.text.plain == before.text.plain and preview.text.spans == before.text.spans
    assert set(preview.text.plain) <= {"▀", "\n"}


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        ("kitty", Mode.KITTY),
        (" SIXEL ", Mode.SIXEL),
        ("halfblock", Mode.HALFBLOCK),
        ("off", Mode.OFF),
    ],
)
def test_the_environment_overrides_the_terminal(value: str, mode: Mode) -> None:
    assert mode_from_env({ENV: value}) is mode
    assert detect({ENV: value}, TTY, TTY) is mode


def test_without_a_terminal_or_a_known_value_previews_are_half_blocks() -> None:
    assert mode_from_env({ENV: "iterm"}) is None and mode_from_env({}) is None
    assert detect({ENV: "iterm"}, PIPE, PIPE) is Mode.HALFBLOCK
    assert detect({}, PIPE, TTY) is Mode.HALFBLOCK
    assert detect({}, TTY, PIPE) is Mode.HALFBLOCK


# ---- the limits come first ----------------------------------------------------------------------


def _refused_images() -> list[bytes]:
    bmp = io.BytesIO()
    Image.new("RGB", (8, 8)).save(bmp, "BMP")
    cut = png((128, 128))
    return [
        bomb_png(),
        cut[: len(cut) // 2],
        bmp.getvalue(),
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"\x89PNG" + b"\0" * MAX_IMAGE_BYTES,
    ]


@pytest.mark.parametrize("mode", [Mode.KITTY, Mode.SIXEL, Mode.HALFBLOCK])
def test_a_refused_image_reaches_no_renderer(monkeypatch: pytest.MonkeyPatch, mode: Mode) -> None:
    from textual_image.renderable import sixel, tgp

    def never(*args: object, **kwargs: object) -> Any:
        raise AssertionError("a renderer ran")

    monkeypatch.setattr(images, "graphic", never)
    monkeypatch.setattr(tgp.Image, "__init__", never)
    monkeypatch.setattr(sixel.Image, "__init__", never)
    for data in _refused_images():
        with pytest.raises(BadImage):
            render_preview(data, mode=mode)


@pytest.mark.parametrize("mode", [Mode.KITTY, Mode.SIXEL])
def test_textual_image_gets_our_decoded_pixels_only(
    monkeypatch: pytest.MonkeyPatch, terminal_out: io.StringIO, mode: Mode
) -> None:
    handed: list[Image.Image] = []

    def spy(image: Image.Image, *args: Any) -> RenderableType | None:
        handed.append(image)
        return graphics.graphic(image, *args)

    monkeypatch.setattr(images, "graphic", spy)
    data = hostile_png((900, 300))
    preview = render_preview(data, mode=mode)
    (image,) = handed
    assert image.mode == "RGB" and image.info == {}  # no text chunk, no ICC profile
    assert image.size == (400, 133)  # scaled to 40 x 10 cells of 10 x 20 pixels
    assert preview.graphic is not None
    text = "".join(segment.text for segment in rendered(preview.graphic))
    out = terminal_out.getvalue()
    assert "evil" not in text and "]52;" not in text and "evil" not in out
    if mode is Mode.KITTY:
        sent, decoded = kitty_png(kitty_messages(out))
        assert b"EVIL" not in sent and b"evil" not in sent and b"tEXt" not in sent
        assert "icc_profile" not in decoded.info and "Comment" not in decoded.info


# ---- in the app ---------------------------------------------------------------------------------

_GRAPHIC_CONTROLS = re.compile(r"\x1b7|\x1b8|\x1b\[\d+A")


@pytest.mark.parametrize("mode", [Mode.KITTY, Mode.SIXEL])
async def test_a_peers_name_and_caption_draw_no_escape_sequences(
    tmp_path: Path, terminal_out: io.StringIO, mode: Mode
) -> None:
    data = hostile_png()
    ref = image_ref(data, HOSTILE + ".png")
    backend = FakeBackend([])
    backend.blobs[ref.id] = data
    backend.messages.append(Message(ANNA, ANNA, NOW, HOSTILE, attachment=ref))
    backend.statuses[ANNA] = (Status.VERIFIED, "")
    app = fake_app(tmp_path, backend, images=mode)
    async with app.run_test(size=(100, 40)) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, MainScreen)
        assert len(backend.previews_fetched) == 1
        assert "\\x1b" in shown(screen)  # the name and caption, escaped as text
        escapes = [
            segment.text
            for strip in screen.query_one(ChatLog).lines
            for segment in strip
            if "\x1b" in segment.text
        ]
    graphic_drawn = False
    for text in escapes:  # only the protocol's own sequences, of pixels we decoded
        assert "evil" not in text
        sixel = SIXEL.fullmatch(text)
        assert sixel or _GRAPHIC_CONTROLS.fullmatch(text), repr(text)
        graphic_drawn = graphic_drawn or bool(sixel)
    if mode is Mode.SIXEL:
        assert graphic_drawn and terminal_out.getvalue() == ""
    else:
        assert escapes == []  # kitty draws placeholders; the pixels went as a PNG
        sent, _ = kitty_png(kitty_messages(terminal_out.getvalue()))
        assert b"evil" not in sent and b"EVIL" not in sent


async def test_previews_off_fetch_nothing(tmp_path: Path) -> None:
    backend = FakeBackend([])
    ref = image_ref(png(), "cat.png")
    backend.blobs[ref.id] = png()
    backend.messages.append(Message(ANNA, ANNA, NOW, "", attachment=ref))
    backend.statuses[ANNA] = (Status.VERIFIED, "")
    app = fake_app(tmp_path, backend, images=Mode.OFF)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, MainScreen)
        assert f"image: previews are off ({ENV}=off)" in shown(app.screen)
        assert backend.previews_fetched == []


# ---- detection at start -------------------------------------------------------------------------

_DETECT = (
    "import sys; from kluis.apps.tui.graphics import detect, cell_pixels; mode = detect(); "
    "print(f'mode={mode} cell={cell_pixels()} loaded={\"textual_image\" in sys.modules}')"
)
_LAZY = (
    "import sys; from PIL import Image; from kluis.apps.tui.graphics import Mode, graphic; "
    "drawn = graphic(Image.new('RGB', (4, 4)), Mode.KITTY, 1, 1); "
    "print(f'drawn={drawn} loaded={\"textual_image\" in sys.modules}')"
)


def _environ(**values: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k != ENV}
    environ.update(values)
    return environ


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "mode=halfblock cell=(10, 20) loaded=False"),
        ("halfblock", "mode=halfblock cell=(10, 20) loaded=False"),
        ("kitty", "mode=kitty cell=(10, 20) loaded=True"),
    ],
)
def test_detection_asks_nothing_when_stdout_is_no_terminal(
    value: str | None, expected: str
) -> None:
    environ = _environ(**({ENV: value} if value else {}))
    done = subprocess.run(
        [sys.executable, "-c", _DETECT],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=environ,
        timeout=60,
        check=True,
    )
    assert done.stdout.decode() == expected + "\n"
    assert done.stderr == b""


def _on_pty(code: str) -> tuple[str, float]:
    """Run ``code`` with a pty (24 x 80 cells of 8 x 20 pixels) as stdin and stdout that never
    answers; what it wrote, and how long it took."""
    import fcntl
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 640, 480))
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=slave,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=_environ(),
    )
    os.close(slave)
    out = b""
    try:
        while time.monotonic() - start < 60:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the pty
                break
            if not chunk:
                break
            out += chunk
        assert process.wait(timeout=10) == 0, process.stderr.read() if process.stderr else b""
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
        if process.stderr:
            process.stderr.close()
    return out.decode(errors="replace"), time.monotonic() - start


@pytest.mark.skipif(sys.platform == "win32", reason="a pty")
def test_detection_on_a_silent_terminal_is_textual_images_and_ends() -> None:
    out, took = _on_pty(_DETECT)
    assert "mode=halfblock cell=(8, 20) loaded=True" in out  # the cell size by ioctl
    assert "\x1b[c" in out and "\x1b_G" in out  # its sixel and kitty queries, unanswered
    assert took < 30


@pytest.mark.skipif(sys.platform == "win32", reason="a pty")
def test_no_graphic_is_made_on_a_terminal_detection_did_not_ask() -> None:
    out, _ = _on_pty(_LAZY)
    assert "drawn=None loaded=False" in out and "\x1b" not in out


def test_only_the_graphics_module_names_textual_image() -> None:
    """One boundary: no other module imports textual-image, eagerly or lazily."""
    src = Path(__file__).resolve().parents[2] / "src"
    naming = {
        str(path.relative_to(src))
        for path in src.rglob("*.py")
        if "textual_image" in path.read_text()
    }
    assert naming == {"kluis/apps/tui/graphics.py"}
