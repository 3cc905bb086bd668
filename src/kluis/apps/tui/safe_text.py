"""Peer-supplied text made harmless for the screen.

Theory of operation: everything a peer chose (message texts, group names, captions) passes
through :func:`safe_text` before it reaches a widget, and only as a :class:`rich.text.Text`
(never a markup string, so ``[bold]`` is just characters). Characters that could move the
cursor, talk to the terminal or reorder what is shown are replaced by a visible escape in a
distinct style: C0 and C1 controls and DEL (so ``\\r``, ESC of ANSI/OSC sequences and the bell),
the bidi embeddings, overrides and isolates (U+202A to U+202E, U+2066 to U+2069), the implicit
direction marks and the Unicode line and paragraph separators. A line break stays a line break
(the chat view indents what follows it under the message), a tab stays a tab.
"""

from __future__ import annotations

from rich.text import Text

ESCAPE_STYLE = "reverse"

_NAMED = {"\r": "\\r", "\n": "\\n"}
_BIDI = {
    *range(0x202A, 0x202F),  # LRE RLE PDF LRO RLO
    *range(0x2066, 0x206A),  # LRI RLI FSI PDI
    0x200E,  # LRM
    0x200F,  # RLM
    0x061C,  # ALM
    0x2028,  # line separator
    0x2029,  # paragraph separator
}


def needs_escape(ch: str, *, keep_newline: bool = True) -> bool:
    cp = ord(ch)
    if ch == "\t" or (ch == "\n" and keep_newline):
        return False
    return cp < 0x20 or 0x7F <= cp <= 0x9F or cp in _BIDI


def escape_char(ch: str) -> str:
    """The visible form of a character :func:`needs_escape` refused."""
    if ch in _NAMED:
        return _NAMED[ch]
    cp = ord(ch)
    return f"\\x{cp:02x}" if cp <= 0xFF else f"\\u{cp:04x}"


def safe_text(text: str, style: str = "", *, keep_newline: bool = True) -> Text:
    """``text`` as a rich Text with every dangerous character shown escaped (styled)."""
    out = Text(style=style, no_wrap=False)
    run: list[str] = []
    for ch in text:
        if needs_escape(ch, keep_newline=keep_newline):
            if run:
                out.append("".join(run))
                run.clear()
            out.append(escape_char(ch), style=ESCAPE_STYLE)
        else:
            run.append(ch)
    if run:
        out.append("".join(run))
    return out


def safe_line(text: str, style: str = "") -> Text:
    """One line: as :func:`safe_text`, with line breaks escaped too (titles, previews)."""
    return safe_text(text, style, keep_newline=False)


def plain(text: str, *, keep_newline: bool = True) -> str:
    """The escaped form as a plain string (what :func:`safe_text` shows, without styles)."""
    return safe_text(text, keep_newline=keep_newline).plain
