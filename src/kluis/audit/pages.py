"""Seizure audit, page level: does the raw database say which envelopes were deposited together?

Theory of operation. A send stores the recipient's envelope and the sender's copies for its own
other devices in one transaction. The rows say nothing of that (per-device sequence numbers,
whole-hour expiries), but SQLite's files can: pages allocated for overflow in insert order come
out consecutive, and the WAL lists each commit's pages together. This module reads the files as
bytes, the way a seizer would, and finds the pages that hold each pending envelope's bytes:

1. every piece of every pending envelope (its row's body and, in the chunked layout, its pieces in
   ``envelope_chunks``) is known through SQL; 16-byte windows of each piece, every 8 bytes, make an
   index from bytes to envelope. A page is scanned every 9 bytes (8 and 9 are coprime), so any run
   of at least 87 bytes of a piece on a page is found, wherever it sits;
2. **allocation order**: pages that are not B-tree pages (overflow, free) and hold envelope bytes,
   read in page order; an overflow page is allocated when its envelope is written, so each page
   followed by one holding an envelope for another account is a pair in deposit order (the
   recipient's envelope, then the sender's copy for its other device; leaf splits may put a page
   or two between them). B-tree pages are left out: a cell's place on them follows its key;
3. **WAL commits**: frames grouped by commit; the envelopes a commit brought onto a page (absent
   from the page's previous image: an earlier frame, else the database file) are the envelopes
   written together; a commit bringing envelopes for different accounts pairs them (a commit
   that split a leaf also "brings" the cells it moved: still a commit the WAL should not hold).

Not measured: the order of cell contents inside one B-tree page (SQLite places a new cell below
the older ones until the page is rebalanced), the ``-shm`` index's page list (the store scrubs
it at each checkpoint), and anything below the filesystem. The index costs about 12 bytes of
memory per pending body byte: fine for an audit, not for a running server.

An envelope's account comes from the devices table; a device it does not know counts as its own
account. Pairs are findings of kind ``deposit``.
"""

from __future__ import annotations

import itertools
import sqlite3
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kluis.server.store.sqlite import chunk_key

WINDOW = 16  # bytes per indexed window
INDEX_STEP = 8  # windows of each piece start every INDEX_STEP bytes
SCAN_STEP = 9  # a page is probed every SCAN_STEP bytes (coprime with INDEX_STEP)
MIN_PIECE = INDEX_STEP * SCAN_STEP + WINDOW - 1  # shorter pieces cannot always be found
_BTREE_TYPES = {2, 5, 10, 13}
_WAL_MAGIC = {0x377F0682, 0x377F0683}

Envelope = tuple[str, int]  # (device, seq)


@dataclass(slots=True)
class DepositOrder:
    """What the page-level scan saw: pairs (as text for the report) and counts for the notes."""

    allocation_pairs: list[str] = field(default_factory=list)
    wal_pairs: list[str] = field(default_factory=list)
    overflow_pages: int = 0  # non-B-tree pages holding envelope bytes
    wal_commits: int = 0
    orphan_chunks: int = 0  # pieces in envelope_chunks that belong to no stored envelope
    unmatched: int = 0  # envelopes too short to be found on a page (all of them inline)


# ---- what is pending, and where its bytes are -----------------------------------------------------


def pending_pieces(conn: sqlite3.Connection) -> tuple[list[tuple[Envelope, bytes]], int]:
    """(envelope, bytes) for each stored piece of each pending envelope; and orphan pieces."""
    tables = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "envelopes" not in tables:
        return [], 0
    columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(envelopes)")}
    seq = "seq" if "seq" in columns else "id" if "id" in columns else "rowid"
    chunks: dict[bytes, bytes] = {}
    if "envelope_chunks" in tables:
        chunks = {
            bytes(k): bytes(d) for k, d in conn.execute("SELECT key, data FROM envelope_chunks")
        }
    pieces: list[tuple[Envelope, bytes]] = []
    for device, n, body in conn.execute(f"SELECT device_id, {seq}, body FROM envelopes"):
        env = (str(device), int(n))
        pieces.append((env, bytes(body)))
        i = 1
        while (data := chunks.pop(chunk_key(env[0], env[1], i), None)) is not None:
            pieces.append((env, data))
            i += 1
    orphans = len(chunks)  # left over: pieces of no stored envelope
    return pieces, orphans


class PieceIndex:
    def __init__(self, pieces: list[tuple[Envelope, bytes]]) -> None:
        self._at: dict[bytes, Envelope | None] = {}
        for env, data in pieces:
            for start in range(0, len(data) - WINDOW + 1, INDEX_STEP):
                w = data[start : start + WINDOW]
                if len(set(w)) < WINDOW // 2:
                    continue  # low-entropy bytes (padding, zeros) would match anything
                # A window shared by two envelopes says nothing: None.
                self._at[w] = env if self._at.get(w, env) == env else None
        self.found = {env for env, data in pieces if len(data) >= MIN_PIECE}

    def __bool__(self) -> bool:
        return bool(self._at)

    def on(self, page: bytes) -> set[Envelope]:
        at = self._at
        hits = {at.get(page[p : p + WINDOW]) for p in range(0, len(page) - WINDOW + 1, SCAN_STEP)}
        hits.discard(None)
        return hits  # type: ignore[return-value]


# ---- the files --------------------------------------------------------------------------------


def _pages(blob: bytes, page_size: int) -> Iterator[tuple[int, bytes]]:
    for start in range(0, len(blob) - page_size + 1, page_size):
        yield start // page_size + 1, blob[start : start + page_size]


def _is_btree(pgno: int, page: bytes) -> bool:
    return page[100 if pgno == 1 else 0] in _BTREE_TYPES


def _wal_commits(wal: bytes) -> tuple[int, list[list[tuple[int, bytes]]]]:
    """Page size and the WAL's commits, each a list of (page number, image), in file order.

    Frames of an older WAL generation (other salts) still in the file are read too: a seizer
    would. A trailing group with no commit frame is kept as one more group.
    """
    if len(wal) < 32 or not is_wal(wal):
        return 0, []
    page_size = struct.unpack(">I", wal[8:12])[0]
    commits: list[list[tuple[int, bytes]]] = []
    current: list[tuple[int, bytes]] = []
    for start in range(32, len(wal) - 24 - page_size + 1, 24 + page_size):
        pgno, commit_size = struct.unpack(">II", wal[start : start + 8])
        if pgno == 0:
            break
        current.append((pgno, wal[start + 24 : start + 24 + page_size]))
        if commit_size:
            commits.append(current)
            current = []
    if current:
        commits.append(current)
    return page_size, commits


def _account(owner: dict[bytes, str], env: Envelope) -> str:
    return owner.get(env[0].encode(), f"device {env[0]}")


def _pair_text(owner: dict[bytes, str], envs: set[Envelope]) -> str:
    return ", ".join(f"{d[:12]}…#{s} ({_account(owner, (d, s))[:12]}…)" for d, s in sorted(envs))


def is_wal(header: bytes) -> bool:
    """Whether a file starting with ``header`` (4 bytes or more) is a SQLite WAL."""
    return len(header) >= 4 and struct.unpack(">I", header[:4])[0] in _WAL_MAGIC


def scan(
    db: Path, wal_path: Path | None, conn: sqlite3.Connection, owner: dict[bytes, str]
) -> DepositOrder:
    """Look for deposit order in the raw bytes of the database ``db`` and its WAL ``wal_path``
    (when the store has one); ``conn`` reads a copy of them."""
    out = DepositOrder()
    pieces, out.orphan_chunks = pending_pieces(conn)
    index = PieceIndex(pieces)
    out.unmatched = len({env for env, _ in pieces} - index.found)
    if not index:
        return out
    blob = db.read_bytes()
    wal = wal_path.read_bytes() if wal_path is not None and wal_path.exists() else b""
    page_size = int(struct.unpack(">H", blob[16:18])[0]) if len(blob) >= 100 else 0
    page_size = 65536 if page_size == 1 else page_size
    db_pages = dict(_pages(blob, page_size)) if page_size else {}

    # Allocation order: non-B-tree pages holding envelope bytes, in page order.
    holding = [
        (pgno, envs)
        for pgno, page in db_pages.items()
        if not _is_btree(pgno, page) and (envs := index.on(page))
    ]
    out.overflow_pages = len(holding)
    for (p1, e1), (p2, e2) in itertools.pairwise(holding):
        accounts = {_account(owner, e) for e in e1 | e2}
        if len(accounts) > 1:
            out.allocation_pairs.append(f"pages {p1} and {p2}: {_pair_text(owner, e1 | e2)}")

    # WAL order: what each commit brought onto its pages.
    wal_page_size, commits = _wal_commits(wal)
    out.wal_commits = len(commits)
    latest: dict[int, bytes] = {}
    for n, frames in enumerate(commits, 1):
        brought: set[Envelope] = set()
        for pgno, image in frames:
            before = latest.get(pgno)
            if before is None and wal_page_size == page_size:
                before = db_pages.get(pgno)
                if before == image:  # already folded into the database: no earlier image known
                    before = None
            brought |= index.on(image) - (index.on(before) if before else set())
            latest[pgno] = image
        if len({_account(owner, e) for e in brought}) > 1:
            out.wal_pairs.append(f"WAL commit {n}: {_pair_text(owner, brought)}")
    return out
