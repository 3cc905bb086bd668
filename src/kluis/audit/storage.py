"""Seizure audit: what would someone who takes the server's disk find? (``kluis audit-storage``)

Theory of operation: the audit reads, never writes. It walks every file under the data folder
(logs, anything else), every file of the store's footprint (``Store.footprint()``: for SQLite the
database, its WAL and shared-memory index, wherever they are kept) and any extra paths, as raw
bytes, so deleted-but-not-overwritten data in free pages and old WAL frames counts too. It never
opens the store itself, which would change the files: it asks the store class which files a
store at that place keeps (``SqliteStore.footprint_at``), copies them, and reads the copies.
It looks for four kinds of finding:

1. **markers**: plaintext strings the caller knows were sent (as UTF-8, UTF-16, UTF-32, base64
   and hex), and raw byte strings (for example the ciphertext of an envelope already delivered);
2. **private key material**: secrets the caller hands in (``--secret``, or read from client
   profiles with ``--profile``), and anything that looks like a private key: PEM/OpenSSH private
   key blocks and long base64 runs such as vodozemac pickles (the server stores only public keys
   and signatures, which are short);
3. **metadata that outlives delivery**: in a copy of the SQLite database (the footprint file
   that starts with SQLite's header), any row that names
   devices or accounts of two different accounts (a sender/recipient link), envelopes past their
   expiry, and, with ``expect_empty`` (every device has synced), any stored envelope at all;
   likewise attachments (``blobs/``) past their expiry, and with ``expect_empty`` any at all;
4. **deposit order** (``pages.py``): pending envelopes for different accounts whose bytes
   sit in pages allocated one after the other, or that one WAL commit wrote together: the
   recipient's envelope and the sender's copy for its other device, paired.

A finding is a :class:`Finding`; the command exits 1 when there is any, 0 when there is none.
"""

from __future__ import annotations

import base64
import binascii
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from kluis.audit import pages
from kluis.client.records import Identity
from kluis.client.store import ProfileStore
from kluis.errors import LocalProtocolError
from kluis.server.config import ServerConfig
from kluis.server.store.sqlite import SqliteStore

_SQLITE_HEADER = b"SQLite format 3\x00"
# A run of base64 text this long is no public key (43 chars) or signature (86 chars) the server
# keeps; vodozemac pickles are 500+ characters.
LONG_BASE64_RUN = 200
_B64_RUN = re.compile(rb"[A-Za-z0-9+/]{%d,}={0,2}" % LONG_BASE64_RUN)
_PEM_PRIVATE = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str  # "marker", "key", "link", "envelope", "deposit", "blob"
    where: str
    detail: str

    def line(self) -> str:
        return f"FOUND {self.kind}: {self.detail} in {self.where}"


@dataclass(slots=True)
class Report:
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was looked at, for the reader
    files: int = 0

    @property
    def clean(self) -> bool:
        return not self.findings


# ---- encodings of a needle --------------------------------------------------------------------


def _base64_forms(data: bytes) -> list[bytes]:
    """The base64 text that must appear when ``data`` sits anywhere inside an encoded stream.

    For each of the three alignments, keep only the characters that depend on ``data`` alone.
    """
    forms = []
    for shift in range(3):
        encoded = base64.b64encode(bytes(shift) + data)
        start = -(-8 * shift // 6)  # first character made of data bits only
        end = 8 * (shift + len(data)) // 6  # one past the last such character
        core = encoded[start:end]
        if len(core) >= 8:
            forms.append(core)
            forms.append(core.replace(b"+", b"-").replace(b"/", b"_"))  # urlsafe
    return forms


def encodings(text: str) -> dict[str, bytes | list[bytes]]:
    """Every encoding of a plaintext marker worth looking for."""
    raw = text.encode()
    out: dict[str, bytes | list[bytes]] = {
        "utf-8": raw,
        "utf-16-le": text.encode("utf-16-le"),
        "utf-16-be": text.encode("utf-16-be"),
        "utf-32-le": text.encode("utf-32-le"),
        "hex": [raw.hex().encode(), raw.hex().upper().encode()],
        "base64": _base64_forms(raw),
    }
    return out


def byte_encodings(data: bytes) -> dict[str, bytes | list[bytes]]:
    """Encodings of a raw byte string (a key, a ciphertext)."""
    return {
        "raw": data,
        "hex": [data.hex().encode(), data.hex().upper().encode()],
        "base64": _base64_forms(data),
    }


# ---- the scan ---------------------------------------------------------------------------------


def _files(paths: Iterable[Path]) -> Iterator[Path]:
    for p in paths:
        if p.is_file():
            yield p
        elif p.is_dir():
            yield from sorted(q for q in p.rglob("*") if q.is_file())


def _search(
    report: Report, blob: bytes, where: str, kind: str, label: str, forms: dict[str, object]
) -> None:
    for enc, needle in forms.items():
        needles = needle if isinstance(needle, list) else [needle]
        for n in needles:
            assert isinstance(n, bytes)
            pos = blob.find(n) if n else -1
            if pos >= 0:
                report.findings.append(Finding(kind, where, f"{label} ({enc}) at offset {pos}"))
                break


def _looks_like_key(report: Report, blob: bytes, where: str) -> None:
    m = _PEM_PRIVATE.search(blob)
    if m:
        report.findings.append(Finding("key", where, f"PEM private key at offset {m.start()}"))
    for m in _B64_RUN.finditer(blob):
        report.findings.append(
            Finding(
                "key",
                where,
                f"{m.end() - m.start()}-character base64 run at offset {m.start()} "
                "(looks like a vodozemac pickle or an exported key)",
            )
        )


def scan_files(
    report: Report,
    paths: Sequence[Path],
    markers: Sequence[str],
    raw: Sequence[tuple[str, bytes]],
    secrets: Sequence[tuple[str, bytes]],
    no_shapes: Sequence[Path] = (),
) -> None:
    """Markers, raw bytes and secrets in every file under ``paths``; and key-shaped runs,
    except in files under ``no_shapes`` (bitmaps such as PostgreSQL's commit log, whose
    "UUUU…" is a run of committed transactions, not a key)."""
    marker_forms = [(repr(m), encodings(m)) for m in markers if m]
    raw_forms = [(label, byte_encodings(b)) for label, b in raw if b]
    secret_forms = [(label, byte_encodings(b)) for label, b in secrets if b]
    for path in _files(paths):
        report.files += 1
        blob = path.read_bytes()
        where = str(path)
        for label, forms in marker_forms:
            _search(report, blob, where, "marker", f"marker {label}", dict(forms))
        for label, forms in raw_forms:
            _search(report, blob, where, "marker", label, dict(forms))
        for label, forms in secret_forms:
            _search(report, blob, where, "key", label, dict(forms))
        if not any(folder in path.parents for folder in no_shapes):
            _looks_like_key(report, blob, where)


# ---- the database -----------------------------------------------------------------------------


def _header(path: Path, size: int) -> bytes:
    with path.open("rb") as fh:
        return fh.read(size)


def _copy_footprint(files: Sequence[Path], into: Path) -> dict[Path, Path]:
    """Copy the store's files, under their own names, so that opening the copy of the database
    finds its WAL beside it and cannot change the evidence. Original -> copy."""
    copies = {}
    for src in files:
        target = into / src.name
        if target.exists():
            raise LocalProtocolError(f"two files of the store are named {src.name}")
        shutil.copyfile(src, target)
        copies[src] = target
    return copies


def _cells(row: Sequence[object]) -> bytes:
    return b"\x00".join(
        c if isinstance(c, bytes) else str(c).encode() for c in row if c is not None
    )


def scan_database(
    report: Report, footprint: Sequence[Path], *, expect_empty: bool, now: int
) -> None:
    """Row- and page-level findings in the store's SQLite database, found among its files by
    its header (and its WAL by the WAL's magic number), not by their names."""
    files = [p for p in footprint if p.is_file()]
    db = next((p for p in files if _header(p, 16) == _SQLITE_HEADER), None)
    if db is None:
        shown = footprint[0] if footprint else "the store (it keeps no files)"
        report.notes.append(f"no database at {shown}")
        return
    wal = next((p for p in files if pages.is_wal(_header(p, 4))), None)
    with tempfile.TemporaryDirectory() as tmp:
        copies = _copy_footprint(files, Path(tmp))
        conn = sqlite3.connect(copies[db])
        try:
            owner = _scan_tables(report, conn, str(db), expect_empty=expect_empty, now=now)
            _scan_deposit_order(report, db, wal, conn, owner)
        finally:
            conn.close()


def _scan_deposit_order(
    report: Report, db: Path, wal: Path | None, conn: sqlite3.Connection, owner: dict[bytes, str]
) -> None:
    """Pages and WAL frames, read as a seizer would: see ``pages``."""
    seen = pages.scan(db, wal, conn, owner)
    report.notes.append(
        f"{seen.overflow_pages} overflow pages hold envelope bytes; "
        f"{seen.wal_commits} commits in the WAL"
        + (f"; {seen.unmatched} envelopes too short to locate on a page" if seen.unmatched else "")
    )
    for where, what, pairs in (
        (str(db), "overflow pages that follow each other", seen.allocation_pairs),
        (str(wal), "one WAL commit", seen.wal_pairs),
    ):
        if pairs:
            examples = "; ".join(pairs[:3]) + ("; …" if len(pairs) > 3 else "")
            report.findings.append(
                Finding(
                    "deposit",
                    where,
                    f"{len(pairs)} times envelopes for different accounts sit in {what}, "
                    f"pairing sender and recipient by deposit order ({examples})",
                )
            )
    if seen.orphan_chunks:
        report.findings.append(
            Finding(
                "envelope", str(db), f"{seen.orphan_chunks} envelope pieces belong to no envelope"
            )
        )


def _scan_tables(
    report: Report, conn: sqlite3.Connection, where: str, *, expect_empty: bool, now: int
) -> dict[bytes, str]:
    """Row-level findings; returns the owner (account) of every account and device ID."""
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    owner: dict[bytes, str] = {}  # device or account ID -> account
    if "accounts" in tables:
        for (account,) in conn.execute("SELECT id FROM accounts"):
            owner[str(account).encode()] = str(account)
    if "devices" in tables:
        for device, account in conn.execute("SELECT id, account_id FROM devices"):
            owner[str(device).encode()] = str(account)
    report.notes.append(f"{len(owner)} account and device IDs known to the database")

    # A row that names IDs of two different accounts links them (who writes to whom).
    for table in tables:
        if table == "sqlite_sequence":
            continue
        for n, cells in enumerate(conn.execute(f'SELECT * FROM "{table}"'), 1):
            blob = _cells(cells)
            accounts = {a for ident, a in owner.items() if ident in blob}
            if len(accounts) > 1:
                report.findings.append(
                    Finding(
                        "link",
                        f"{where} table {table} row {n}",
                        f"row names IDs of {len(accounts)} different accounts",
                    )
                )

    if "envelopes" in tables:
        stored = conn.execute(
            "SELECT device_id, COUNT(*), SUM(expires_at <= ?) FROM envelopes GROUP BY device_id",
            (now,),
        ).fetchall()
        total = sum(int(n) for _, n, _ in stored)
        report.notes.append(f"{total} stored envelopes for {len(stored)} devices")
        for device, n, expired in stored:
            if int(expired or 0):
                report.findings.append(
                    Finding("envelope", where, f"{expired} expired envelopes kept for {device}")
                )
            if expect_empty:
                report.findings.append(
                    Finding("envelope", where, f"{n} envelopes still stored for {device}")
                )
        _note_adjacent_deposits(report, conn, owner)
        pieces = "SELECT body FROM envelopes" + (
            " UNION ALL SELECT data FROM envelope_chunks" if "envelope_chunks" in tables else ""
        )
        for (body,) in conn.execute(pieces):
            named = {a for ident, a in owner.items() if ident in bytes(body)}
            if named:
                report.findings.append(
                    Finding("link", where, "an envelope body names an account or device ID")
                )
    return owner


def _note_adjacent_deposits(
    report: Report, conn: sqlite3.Connection, owner: dict[bytes, str]
) -> None:
    """Pending envelopes with consecutive IDs and equal expiry, for two different accounts.

    A sender with another device deposits its own copies right after the recipient's envelopes,
    so such a pair may say who wrote to whom while both are undelivered. Timing, not a stored
    link: a note, not a finding (unrelated sends in the same second look the same). The store
    keeps no global envelope id and whole-hour expiries precisely so that this stays silent; the
    check guards a database of an older layout.
    """
    columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(envelopes)")}
    if "id" not in columns:
        return  # no global envelope id (the store keeps a per-device sequence): nothing to pair
    pairs = 0
    prev: tuple[int, int, str | None] | None = None
    for env_id, device, expires in conn.execute(
        "SELECT id, device_id, expires_at FROM envelopes ORDER BY id"
    ):
        account = owner.get(str(device).encode())
        if prev and prev[0] == env_id - 1 and prev[1] == expires and prev[2] != account:
            pairs += 1
        prev = (int(env_id), int(expires), account)
    if pairs:
        report.notes.append(
            f"{pairs} pairs of pending envelopes for different accounts were deposited together "
            "(timing may pair a sender with a recipient until they are delivered)"
        )


def scan_blobs(report: Report, folder: Path, *, expect_empty: bool, now: int) -> None:
    """Attachments kept past their expiry, or (``expect_empty``) kept at all."""
    from kluis.server.blob_files import BlobFiles

    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        header = BlobFiles.read_header(path) if path.is_file() else None
        if header is None:
            continue
        if header.expires_at <= now:
            report.findings.append(Finding("blob", str(path), "expired attachment still kept"))
        elif expect_empty:
            report.findings.append(
                Finding(
                    "blob", str(path), f"attachment still stored ({header.remaining} fetches due)"
                )
            )


# ---- entry point ------------------------------------------------------------------------------


def audit(
    data: Path,
    *,
    footprint: Sequence[Path] | None = None,
    markers: Sequence[str] = (),
    raw: Sequence[tuple[str, bytes]] = (),
    secrets: Sequence[tuple[str, bytes]] = (),
    extra_paths: Sequence[Path] = (),
    expect_empty: bool = False,
    now: int | None = None,
) -> Report:
    """Audit the data folder ``data``, the store's files ``footprint`` (by default those of the
    store a server on ``data`` opens: see :func:`store_footprint`) and ``extra_paths`` (e.g. log
    files kept elsewhere)."""
    if not data.is_dir():
        raise LocalProtocolError(f"no data folder at {data}")
    if footprint is None:
        footprint = store_footprint(data)
    report = Report()
    # The data folder is walked whole; the store's files kept outside it are added.
    elsewhere = [p for p in footprint if data.resolve() not in p.resolve().parents]
    scan_files(report, [data, *extra_paths, *elsewhere], markers, raw, secrets)
    scan_database(report, footprint, expect_empty=expect_empty, now=int(now or time.time()))
    scan_blobs(report, data / "blobs", expect_empty=expect_empty, now=int(now or time.time()))
    return report


def store_footprint(data: Path, database_url: str | None = None) -> list[Path]:
    """The files of the store that a server on ``data`` keeps, asked of the store's class:
    by default the server's own database; ``database_url`` (``sqlite:///path`` or a plain
    path) names one kept elsewhere. A PostgreSQL store keeps its rows in the PostgreSQL
    server's data directory: ``postgres.audit_postgres`` reads that."""
    if database_url is None:
        return SqliteStore.footprint_at(ServerConfig(data_dir=data).database_path)
    if database_url.startswith("sqlite:///"):
        # As SQLAlchemy: sqlite:////abs, sqlite:///rel
        return SqliteStore.footprint_at(Path(database_url[len("sqlite:///") :]))
    if database_url.startswith(("postgres://", "postgresql://")):
        raise LocalProtocolError(
            "auditing PostgreSQL needs --pgdata DIR, the PostgreSQL server's data directory"
        )
    if "://" in database_url:
        raise LocalProtocolError(f"unsupported database URL {database_url.split('://')[0]}://")
    return SqliteStore.footprint_at(Path(database_url))


def decode_secret(text: str) -> bytes:
    """A secret given on the command line, as hex or base64."""
    try:
        return bytes.fromhex(text)
    except ValueError:
        pass
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise LocalProtocolError("--secret takes hex or base64") from exc


def profile_secrets(profile: Path, passphrase: str) -> list[tuple[str, bytes]]:
    """The private material a client profile holds: what must never reach the server. None
    for a folder without a profile (erased: ``kluis wipe`` or the panic passphrase)."""
    if not ProfileStore.exists(profile):
        return []
    store = ProfileStore.open(profile, passphrase)
    try:
        raw = store.get("identity")
        if raw is None:
            return []
        identity = msgspec.msgpack.decode(raw, type=Identity)
        name = profile.name
        return [
            (f"sealing private key of {name}", identity.seal_private),
            (f"Olm account pickle of {name}", identity.account_pickle.encode()[:64]),
            (f"pickle key of {name}", store.pickle_key),
            *(
                [(f"account identity key of {name}", identity.account_key)]
                if identity.account_key
                else []
            ),
        ]
    finally:
        store.close()
