"""Inline image previews: a peer's image decoded under limits, drawn with half blocks, kitty or sixel.

Theory of operation: the bytes of a received image come from a peer, so they are treated as
hostile. :func:`render_preview` (run in a worker thread, never on the UI's loop) refuses them
with :class:`~kluis.errors.BadImage` unless every limit holds: at most
:data:`MAX_IMAGE_BYTES` before anything is decoded, a format of :data:`FORMATS` only (Pillow
is told to try no other decoder), at most :data:`MAX_PIXELS` pixels read from the header
before the pixel data is decoded (below Pillow's own ``Image.MAX_IMAGE_PIXELS``, whose bomb
check also applies), and only the first frame of an animation. What passes is scaled to fit
``cols`` x ``rows`` cells and drawn as "▀" characters, the top pixel the foreground and the
bottom one the background, which any colour terminal shows.

With ``mode`` kitty or sixel (:mod:`.graphics`: ``KLUIS_IMAGES`` or the terminal's answer) the
image is scaled instead to the cells' size in pixels and :attr:`Preview.graphic` is
textual-image's renderable for it; the half-block drawing is made too, from the same pixels, for
where a graphic cannot be drawn. All the limits above run first, in :func:`_decode`:
textual-image only ever receives the decoded, scaled :class:`PIL.Image.Image` made here, never
the peer's bytes (nor their name, caption or metadata), and re-encodes its pixels itself.
Pillow is imported here and in textual-image only.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from rich.console import RenderableType
from rich.style import Style
from rich.text import Text

from kluis.apps.tui.graphics import Mode, cell_pixels, graphic
from kluis.errors import BadImage
from kluis.protocol.attachment import AttachmentRef

__all__ = [
    "FORMATS",
    "MAX_IMAGE_BYTES",
    "MAX_PIXELS",
    "Preview",
    "is_image",
    "render_preview",
]

MAX_IMAGE_BYTES = 8 * 1024 * 1024  # fetched for a preview at most; bigger ones are saved
MAX_PIXELS = min(24_000_000, Image.MAX_IMAGE_PIXELS or 24_000_000)  # about 6000 x 4000
# Pillow's own bomb check, at open: a warning over MAX_IMAGE_PIXELS, an error over twice that.
# Both become errors here (a warning printed over a full-screen app, and the decode going on,
# are what must not happen); the filter names Pillow's category only.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)
FORMATS = ("PNG", "JPEG", "GIF", "WEBP")
_MIMES = {"image/png", "image/jpeg", "image/gif", "image/webp"}
_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
PREVIEW_COLS = 40
PREVIEW_ROWS = 10
_BACKDROP = (40, 40, 40)  # behind transparent pixels


def is_image(ref: AttachmentRef) -> bool:
    """Whether ``ref`` claims to be an image we preview (the sender's claim: the decoder checks
    the format again)."""
    return ref.mime.lower() in _MIMES or (ref.name or "").lower().endswith(_SUFFIXES)


@dataclass(frozen=True, slots=True)
class Preview:
    """A drawn preview: ``text`` is ``rows`` lines of ``cols`` half blocks; ``graphic``, when
    the mode is kitty or sixel, textual-image's renderable of the same image."""

    text: Text
    width: int  # of the image, in pixels
    height: int
    format: str
    graphic: RenderableType | None = None

    @property
    def renderable(self) -> RenderableType:
        """What the chat shows: the graphic if there is one, else the half blocks."""
        return self.text if self.graphic is None else self.graphic


def _decode(data: bytes, box: tuple[int, int]) -> tuple[Image.Image, tuple[int, int], str]:
    """``data`` decoded under the limits and scaled to fit ``box`` pixels, RGB; the original
    size and format."""
    if len(data) > MAX_IMAGE_BYTES:
        raise BadImage(f"too large: {len(data)} bytes (at most {MAX_IMAGE_BYTES})")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except UnidentifiedImageError as exc:
        raise BadImage("not a PNG, JPEG, GIF or WebP image") from exc
    except _BOMB as exc:
        raise BadImage(f"too large: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"malformed image: {exc}") from exc
    size, kind = image.size, image.format or ""
    width, height = size
    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        raise BadImage(f"too large: {width}x{height} pixels (at most {MAX_PIXELS})")
    try:
        image.seek(0)  # the first frame only
        image.draft("RGB", box)  # JPEG: decode at a reduced scale
        image.load()
        image.thumbnail(box)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, _BACKDROP)
            flat.paste(rgba, mask=rgba.getchannel("A"))
            rgb = flat
        else:
            rgb = image.convert("RGB")
        # Pixels only: ``info`` (the peer's text chunks, ICC profile, EXIF) stays behind, so
        # that nothing re-encoding this image (textual-image's PNG for kitty) passes it on.
        return Image.frombytes("RGB", rgb.size, rgb.tobytes()), size, kind
    except _BOMB as exc:
        raise BadImage(f"too large: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(f"malformed image: {exc}") from exc


def render_preview(
    data: bytes,
    cols: int = PREVIEW_COLS,
    rows: int = PREVIEW_ROWS,
    mode: Mode = Mode.HALFBLOCK,
) -> Preview:
    """Decode ``data`` under the limits above and draw it in at most ``cols`` x ``rows`` cells
    (with ``mode``: see :mod:`.graphics`); :class:`~kluis.errors.BadImage` says why not.
    Blocking: call it from a worker thread."""
    if not mode.graphics:
        image, original, kind = _decode(data, (cols, rows * 2))
        return Preview(_half_blocks(image), original[0], original[1], kind)
    cell_width, cell_height = cell_pixels()
    image, original, kind = _decode(data, (cols * cell_width, rows * cell_height))
    used = (-(-image.width // cell_width), -(-image.height // cell_height))  # cells, rounded up
    small = image.copy()
    small.thumbnail((cols, rows * 2))
    drawn = graphic(image, mode, *used)
    return Preview(_half_blocks(small), original[0], original[1], kind, drawn)


def _half_blocks(image: Image.Image) -> Text:
    width, height = image.size
    pixels = image.load()
    assert pixels is not None
    lines: list[Text] = []
    for top in range(0, height, 2):
        line = Text(no_wrap=True, overflow="crop")
        for x in range(width):
            upper = _rgb(pixels[x, top])
            lower = _rgb(pixels[x, top + 1]) if top + 1 < height else _BACKDROP
            line.append("▀", Style(color=f"rgb{upper}", bgcolor=f"rgb{lower}"))
        lines.append(line)
    return Text("\n").join(lines)


def _rgb(value: object) -> tuple[int, int, int]:
    assert isinstance(value, tuple)
    red, green, blue = value[:3]
    return (int(red), int(green), int(blue))
