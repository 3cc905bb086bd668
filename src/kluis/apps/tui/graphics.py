"""Terminal graphics for image previews: which protocol, and textual-image's renderables.

Theory of operation: a preview is drawn in one of four :class:`Mode` s. ``halfblock`` is
:mod:`.images`' own drawing ("▀" characters, any colour terminal); ``kitty`` (the terminal
graphics protocol) and ``sixel`` hand the picture to the `textual-image` package; ``off`` shows
no preview and fetches nothing. :func:`detect` picks one, once, before the app takes the
terminal: the environment variable ``KLUIS_IMAGES`` (``kitty``, ``sixel``, ``halfblock`` or
``off``) wins; otherwise textual-image's own detection, which queries the terminal when its
package is imported (Device Attributes for sixel, a kitty graphics query, 0.1 s each for an
answer) and asks it for its cell size in pixels.

That import is the only place where textual-image talks to the terminal on its own, so it is
imported here only, and only (a) by :func:`detect` while stdin and stdout are both terminals
and Textual does not yet read stdin (it would swallow the answers), or (b) when stdout is no
terminal, where its detection asks nothing and settles on no protocol (tests, pipes). In any
other case :func:`graphic` draws no graphic and the preview falls back to half blocks.

What textual-image receives is a :class:`PIL.Image.Image` that :mod:`.images` decoded under its
limits and scaled, never a peer's bytes: its renderables re-encode those pixels (a PNG for
kitty, sixel bands for sixel), so nothing a peer sent but pixels reaches the terminal.
"""

from __future__ import annotations

import enum
import importlib
import os
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image
    from rich.console import RenderableType

__all__ = ["ENV", "Mode", "cell_pixels", "detect", "graphic", "mode_from_env"]

ENV = "KLUIS_IMAGES"
_DEFAULT_CELL = (10, 20)  # pixels of a cell when the terminal does not say (textual-image's own)


class Mode(enum.StrEnum):
    """How previews are drawn."""

    KITTY = "kitty"
    SIXEL = "sixel"
    HALFBLOCK = "halfblock"
    OFF = "off"

    @property
    def graphics(self) -> bool:
        """Whether textual-image draws this mode."""
        return self in (Mode.KITTY, Mode.SIXEL)


def mode_from_env(environ: Mapping[str, str]) -> Mode | None:
    """The mode ``KLUIS_IMAGES`` asks for; None when unset or not one of the four."""
    value = environ.get(ENV, "").strip().lower()
    try:
        return Mode(value) if value else None
    except ValueError:
        return None


def _is_terminal(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # closed
        return False


def _load(*, may_probe: bool) -> ModuleType | None:
    """``textual_image.renderable``, imported when that cannot query a running app's terminal."""
    loaded = sys.modules.get("textual_image.renderable")
    if loaded is not None:
        return loaded
    if not may_probe and _is_terminal(sys.__stdout__):
        return None  # its import would query the terminal under Textual: no graphics
    try:
        return importlib.import_module("textual_image.renderable")
    except Exception:  # a terminal it cannot query (termios.error) is no reason to stop
        return None


def detect(
    environ: Mapping[str, str] = os.environ,
    stdin: object = None,
    stdout: object = None,
) -> Mode:
    """The mode for this run, from ``KLUIS_IMAGES`` or the terminal. Call it before the app
    runs: on a terminal it may query it (textual-image's detection, at most a few tenths of a
    second); with stdin or stdout not a terminal it asks nothing."""
    stdin = sys.__stdin__ if stdin is None else stdin
    stdout = sys.__stdout__ if stdout is None else stdout
    forced = mode_from_env(environ)
    if forced is not None and not forced.graphics:
        return forced  # textual-image is not even imported
    on_terminal = _is_terminal(stdin) and _is_terminal(stdout)
    if forced is None and not on_terminal:
        return Mode.HALFBLOCK
    module = _load(may_probe=on_terminal)
    if module is None:
        return Mode.HALFBLOCK
    cell_pixels()  # ask for the cell size now, while an answer can still be read
    if forced is not None:
        return forced
    if module.Image is module.TGPImage:
        return Mode.KITTY
    if module.Image is module.SixelImage:
        return Mode.SIXEL
    return Mode.HALFBLOCK


def cell_pixels() -> tuple[int, int]:
    """A terminal cell's width and height in pixels: textual-image's answer, cached on its first
    call (by :func:`detect`), or 10 x 20 when it is not loaded or cannot tell."""
    terminal = sys.modules.get("textual_image._terminal")
    if terminal is None:
        return _DEFAULT_CELL
    try:
        width, height = terminal.get_cell_size()
    except Exception:  # no terminal to ask (closed stdout, termios.error)
        # textual-image caches its answer on the function: fill it, so that no render asks
        terminal.get_cell_size._result = terminal.CellSize(*_DEFAULT_CELL)
        return _DEFAULT_CELL
    return (int(width), int(height)) if width > 0 and height > 0 else _DEFAULT_CELL


def graphic(image: Image.Image, mode: Mode, cols: int, rows: int) -> RenderableType | None:
    """textual-image's renderable drawing ``image`` (decoded and scaled by :mod:`.images`) in
    ``cols`` x ``rows`` cells with ``mode``; None for the modes it does not draw or when it
    cannot be loaded now (the caller draws half blocks)."""
    if not mode.graphics:
        return None
    module = _load(may_probe=False)
    if module is None:
        return None
    cell_pixels()  # the cache filled, so that rendering never queries the terminal
    renderable: RenderableType
    if mode is Mode.KITTY:
        renderable = module.TGPImage(image, width=cols, height=rows)
    else:
        renderable = module.SixelImage(image, width=cols, height=rows)
    return renderable
