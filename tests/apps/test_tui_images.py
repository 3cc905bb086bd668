"""Image previews: the decoder's limits (bomb, truncated, formats, frames) and the chat view
(previews of verified senders, F5 for the others, placeholders with the reason)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from textual.pilot import Pilot

from kluis.apps.tui import images
from kluis.apps.tui.images import MAX_IMAGE_BYTES, MAX_PIXELS, is_image, render_preview
from kluis.apps.tui.screens.main import MainScreen
from kluis.apps.tui.widgets import ChatLog
from kluis.client.events import MessagesExpired
from kluis.client.records import Message
from kluis.client.verification import Status
from kluis.errors import BadImage
from kluis.protocol.attachment import AttachmentRef
from tests.apps.tui_fakes import ANNA, NOW, FakeBackend, fake_app, wait_workers


def png(size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(side: int = 100_000) -> bytes:
    """A PNG of a few hundred bytes whose header claims side x side pixels: decoded, it would
    take tens of gigabytes."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * 4096, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", rows)
        + _chunk(b"IEND", b"")
    )


def image_ref(data: bytes, name: str = "cat.png", mime: str = "image/png") -> AttachmentRef:
    blob = f"{zlib.crc32(data + name.encode()):032x}"
    return AttachmentRef(
        id=blob, key=b"k" * 32, digest=b"d" * 32, size=len(data), name=name, mime=mime
    )


# ---- the decoder --------------------------------------------------------------------------------


def test_a_png_is_drawn_in_half_blocks_within_its_cells() -> None:
    preview = render_preview(png((64, 48)), cols=40, rows=10)
    lines = preview.text.plain.split("\n")
    assert (preview.width, preview.height, preview.format) == (64, 48, "PNG")
    assert 1 <= len(lines) <= 10 and all(0 < len(line) <= 40 for line in lines)
    assert set(preview.text.plain) <= {"▀", "\n"}
    styles = {str(span.style) for span in preview.text.spans}
    assert any("rgb(200,10,10)" in style.replace(" ", "") for style in styles)


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    data = bomb_png()
    assert len(data) < 1024
    with pytest.raises(BadImage, match=r"too large: .*10000000000 pixels") as caught:
        render_preview(data)
    assert caught.value.code == "bad_image"


def test_an_image_over_the_pixel_limit_is_refused_before_its_pixels() -> None:
    side = int(MAX_PIXELS**0.5) + 10  # over the limit, under Pillow's error
    with pytest.raises(BadImage, match="too large"):
        render_preview(bomb_png(side))


def test_a_truncated_image_is_refused() -> None:
    data = png((128, 128))
    with pytest.raises(BadImage, match="malformed image"):
        render_preview(data[: len(data) // 2])


def test_formats_other_than_png_jpeg_gif_webp_are_refused() -> None:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "BMP")
    with pytest.raises(BadImage, match="not a PNG, JPEG, GIF or WebP"):
        render_preview(out.getvalue())
    with pytest.raises(BadImage, match="not a PNG"):
        render_preview(b"<svg xmlns='http://www.w3.org/2000/svg'/>")


def test_too_many_bytes_are_refused_before_decoding() -> None:
    with pytest.raises(BadImage, match=f"at most {MAX_IMAGE_BYTES}"):
        render_preview(b"\x89PNG" + b"\0" * MAX_IMAGE_BYTES)


def test_only_the_first_frame_of_an_animation_is_drawn() -> None:
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    out = io.BytesIO()
    red.save(out, "GIF", save_all=True, append_images=[blue], duration=100)
    styles = " ".join(str(s.style) for s in render_preview(out.getvalue()).text.spans)
    assert "rgb(255,0,0)" in styles.replace(" ", "") and "rgb(0,0,255)" not in styles


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_are_drawn(fmt: str) -> None:
    out = io.BytesIO()
    Image.new("RGB", (300, 200), (0, 160, 0)).save(out, fmt)
    preview = render_preview(out.getvalue(), cols=30, rows=5)
    assert preview.format == fmt and len(preview.text.plain.split("\n")) <= 5


def test_which_attachments_count_as_images() -> None:
    assert is_image(image_ref(b"x", "a.PNG", ""))
    assert is_image(image_ref(b"x", "photo", "image/jpeg"))
    assert not is_image(image_ref(b"x", "notes.txt", "text/plain"))
    assert not is_image(image_ref(b"x", "draw.svg", "image/svg+xml"))


# ---- the chat view ------------------------------------------------------------------------------


def shown(screen: MainScreen) -> str:
    """The chat's text, wrapped lines joined again."""
    log = screen.query_one(ChatLog)
    return " ".join(" ".join("".join(s.text for s in strip).split()) for strip in log.lines)


async def settle(pilot: Pilot[Any]) -> None:
    await wait_workers(pilot.app)
    await pilot.pause()
    await wait_workers(pilot.app)
    await pilot.pause()


def with_images(*files: tuple[bytes, str]) -> FakeBackend:
    backend = FakeBackend([])
    for data, name in files:
        ref = image_ref(data, name)
        backend.blobs[ref.id] = data
        backend.messages.append(Message(ANNA, ANNA, NOW, "", attachment=ref))
    return backend


async def test_an_unverified_senders_image_waits_for_f5(tmp_path: Path) -> None:
    backend = with_images((png(), "cat.png"))
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, MainScreen) and screen.book.open_id == ANNA
        assert "image: unverified sender · F5 shows it" in shown(screen)
        assert backend.previews_fetched == []  # nothing fetched, nothing decoded
        await pilot.press("f5")
        await settle(pilot)
        assert len(backend.previews_fetched) == 1
        assert "▀" in shown(screen) and "unverified" not in shown(screen)


async def test_a_verified_senders_image_shows_and_a_bad_one_says_why(tmp_path: Path) -> None:
    good, bomb, cut = png(), bomb_png(), png((128, 128))[:300]
    backend = with_images((good, "cat.png"), (bomb, "bomb.png"), (cut, "cut.png"))
    backend.statuses[ANNA] = (Status.VERIFIED, "")
    backend.hold.clear()  # the fetches wait: the chat says they are on their way
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(80, 40)) as pilot:
        await pilot.pause(0.3)
        screen = app.screen
        assert isinstance(screen, MainScreen)
        assert "loading the preview…" in shown(screen)
        backend.hold.set()
        await settle(pilot)
        text = shown(screen)
        assert "▀" * 10 in text
        assert "image not shown: too large:" in text
        assert "image not shown: malformed image" in text
        assert "bad_image" in text
        assert len(backend.previews_fetched) == 3


async def test_an_image_over_the_fetch_limit_is_not_fetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 100)
    monkeypatch.setattr("kluis.apps.tui.screens.main.MAX_IMAGE_BYTES", 100)
    backend = with_images((png((256, 256), (1, 2, 3)), "big.png"))
    backend.statuses[ANNA] = (Status.VERIFIED, "")
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, MainScreen)
        assert "image not shown:" in shown(app.screen) and "blob_too_large" in shown(app.screen)


async def test_previews_go_with_their_disappearing_messages(tmp_path: Path) -> None:
    backend = with_images((png(), "cat.png"))
    backend.statuses[ANNA] = (Status.VERIFIED, "")
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, MainScreen) and "▀" in shown(screen)
        assert len(screen.previews) == 1
        backend.messages.clear()  # the timer ran out: gone from the profile
        backend.emit(MessagesExpired(1))
        await settle(pilot)
        assert screen.previews == {} and "▀" not in shown(screen)


async def test_f5_tries_a_failed_preview_again(tmp_path: Path) -> None:
    backend = with_images((png(), "cat.png"))
    (blob,) = backend.blobs
    app = fake_app(tmp_path, backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, MainScreen)
        screen.previews[blob] = "offline (transport)"  # as a fetch that failed leaves it
        screen.images_opened.add(ANNA)
        screen._fill_chat()
        await settle(pilot)
        assert "image not shown: offline (transport)" in shown(screen)
        await pilot.press("f5")
        await settle(pilot)
        assert "▀" in shown(screen) and "offline" not in shown(screen)
