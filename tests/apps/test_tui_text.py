"""The app's rules without a screen: peer text made safe, the conversation list, back-off,
passphrase strength."""

from __future__ import annotations

from datetime import timedelta

from kluis.apps.tui.model import (
    ConversationBook,
    Notice,
    backoff,
    is_account_id,
    parse_ids,
    strength,
)
from kluis.apps.tui.safe_text import ESCAPE_STYLE, plain, safe_line, safe_text
from kluis.apps.tui.widgets import qr_text
from kluis.client.records import Message
from tests.apps.tui_fakes import ANNA, BRAM, GROUP, ME, NASTY, FakeBackend

CONTROL = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]} - {"\n", "\t"}
BIDI = {chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]}


def test_controls_escapes_and_bidi_overrides_are_shown_escaped() -> None:
    text = safe_text(NASTY)
    assert text.plain == (
        "ok\\rannak3v7q2xw5zpe: fake\\x1b[2J\\x07 \\u202eevil\\u202c\nsecond line"
    )
    assert not (set(text.plain) & (CONTROL | BIDI))
    escaped = [text.plain[s.start : s.end] for s in text.spans if s.style == ESCAPE_STYLE]
    assert escaped == ["\\r", "\\x1b", "\\x07", "\\u202e", "\\u202c"]
    # every character a peer could use against the terminal, one by one
    for ch in CONTROL | BIDI | {"\u200e", "\u200f", "\u061c", "\u2028", "\u2029"}:
        assert ch not in plain(f"a{ch}b"), repr(ch)
    assert plain("tab\tstays") == "tab\tstays"
    assert safe_line("two\nlines").plain == "two\\nlines"  # titles and previews: one line


def test_markup_in_peer_text_is_just_text() -> None:
    assert safe_text("[bold red]hi[/] [link=http://x]y[/link]").plain == (
        "[bold red]hi[/] [link=http://x]y[/link]"
    )
    assert safe_text("[bold]x[/bold]").spans == []


def test_conversation_list_from_history_and_groups_with_unread_counts() -> None:
    backend = FakeBackend()
    book = ConversationBook(ME)
    book.load(backend.messages, [g for g in backend._groups])
    rows = book.rows()
    assert [r.id for r in rows] == [GROUP, ANNA, BRAM]  # most recent first
    assert rows[0].title == "Book club" and rows[0].is_group and rows[0].preview == "Thanks Bram"
    assert all(r.unread == 0 for r in rows)  # history is not "unread since opened"

    book.open(ANNA)
    last = rows[0].last
    assert last is not None
    later = last + timedelta(minutes=5)
    book.add(Message(BRAM, BRAM, later, "new"))
    book.add(Message(ANNA, ANNA, later, "seen: open"))
    book.add(Message(ME, BRAM, later, "mine"))
    assert book.get(BRAM).unread == 1  # type: ignore[union-attr]
    assert book.get(ANNA).unread == 0  # type: ignore[union-attr]
    book.open(BRAM)
    assert book.get(BRAM).unread == 0  # type: ignore[union-attr]

    book.notice(Notice(later, "unreadable", "unreadable message (crypto): bad"))
    assert book.get("!unreadable").unread == 1  # type: ignore[union-attr]


def test_ids() -> None:
    assert is_account_id(ANNA) and not is_account_id(GROUP) and not is_account_id("ANNA")
    assert parse_ids(f"{ANNA}, {BRAM.upper()} {ANNA}") == [ANNA, BRAM]


def test_backoff_grows_is_capped_and_jittered() -> None:
    low = [backoff(n, lambda: 0.0) for n in range(12)]
    high = [backoff(n, lambda: 1.0) for n in range(12)]
    assert low[0] == 0.25 and high[0] == 0.5
    assert low == sorted(low) and high[-1] == 30.0 and low[-1] == 15.0
    assert backoff(10_000, lambda: 0.5) <= 30.0


def test_passphrase_strength() -> None:
    assert not strength("").acceptable
    assert strength("abc").label == "weak"
    assert strength("Tr0ub4dor&3x").label in ("fair", "strong")
    assert strength("correct horse battery staple").label == "strong"
    assert strength("a" * 40).label == "weak"  # length of one repeated character is no help


def test_qr_code_is_dark_on_light_half_blocks() -> None:
    qr = qr_text(ME)
    lines = qr.plain.split("\n")
    assert len({len(line) for line in lines}) == 1 and len(lines) <= 15
    assert set(qr.plain) <= {" ", "▀", "▄", "█", "\n"}
    assert "black on white" in str(qr.style)
