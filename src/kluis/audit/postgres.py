"""Seizure audit of a store on PostgreSQL: its data directory read raw, as a thief would.

Theory of operation: the audit asks the live database (read only: ``PostgresStore``'s
``inspect``) for the facts a thief would also have or could guess: which folder under
``base/`` holds this database, the account and device IDs, the wrapped storage keys. Then it
reads the data directory's files as raw bytes: the database's own folder, ``global/``, the WAL
(``pg_wal/``) and everything else; other databases' folders under ``base/`` are skipped (they
cannot hold this database's rows). Run a ``CHECKPOINT`` first, or the newest changes sit only
in the WAL (which is read too). It finds:

1. **markers**: plaintexts and raw bytes (delivered envelopes' ciphertexts as the clients sent
   them), in every encoding ``storage`` knows, and redeemed licence codes (``--licence``): the
   code's text and its SHA-256 hash, which is what a store without the key file would keep;
2. **envelopes** kept past their expiry and, with ``expect_empty``, any envelope at all;
   **keys**: with the storage key file (``--storage-key-file``), the key-encryption keys it
   yields (the file's version up to the next), its index key and every live epoch key
   unwrapped: none of them may appear in PostgreSQL's files;
3. **links**: heap tuples, live and dead, parsed from the database's pages: a tuple naming IDs
   of two accounts, or one transaction (the tuples' ``xmin`` or ``xmax``) that wrote or
   deleted rows naming devices of two accounts: the recipient's envelope and the sender's copy
   for its other device. Without the key file the audit sees the names a thief of the data
   directory sees; with it, also the mailbox names (``sealing.KeyRing.mailbox``) a thief with
   the key file too could compute: those findings say so.

The WAL is searched raw (1 and 2), not parsed into records for 3.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from kluis.audit.storage import Finding, Report, scan_files
from kluis.errors import LocalProtocolError, StorageKeyError
from kluis.server.accounts import licence_hash, normalise_licence
from kluis.server.store.postgres import Inspection, inspect
from kluis.server.store.sealing import KeyFile, KeyRing

PAGE = 8192
_LINE_POINTER = struct.Struct("<I")
# xmin, xmax, cid or xvac, ctid (block high, block low, offset), infomask2, infomask, hoff
_TUPLE_HEADER = struct.Struct("<IIIHHHHHB")
_XMAX_IS_MULTI = 0x1000


def heap_tuples(data: bytes) -> Iterator[tuple[int, int, bool, bytes]]:
    """(xmin, xmax, xmax is a multixact, tuple data) of every heap tuple whose line pointer still
    points at it (normal or dead), page by page. Index and other pages are skipped by their
    shape: a heap page has no special space."""
    for start in range(0, len(data) - PAGE + 1, PAGE):
        page = data[start : start + PAGE]
        lower, upper, special, size_version = struct.unpack_from("<HHHH", page, 12)
        if not (24 <= lower <= upper <= special == PAGE and size_version & 0xFF00 == PAGE):
            continue
        for at in range(24, lower, 4):
            (lp,) = _LINE_POINTER.unpack_from(page, at)
            offset, flags, length = lp & 0x7FFF, (lp >> 15) & 3, lp >> 17
            if flags not in (1, 3) or length < 24 or offset + length > PAGE:
                continue
            xmin, xmax, _, _, _, _, _, infomask, hoff = _TUPLE_HEADER.unpack_from(page, offset)
            if hoff < 23 or hoff > length:
                continue
            yield xmin, xmax, bool(infomask & _XMAX_IS_MULTI), page[offset + hoff : offset + length]


def _relation_files(folder: Path) -> Iterator[Path]:
    """A database folder's table and index files (not their free-space and visibility maps)."""
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.split(".")[0].isdigit():
            yield p


def scan_links(report: Report, folder: Path, names: dict[bytes, tuple[str, bool]]) -> None:
    """Findings 3: ``names`` maps each name a tuple may hold to (account, computable only with
    the key file)."""
    by_xid: dict[tuple[str, int], set[str]] = {}
    keyed: set[tuple[str, int]] = set()
    where: dict[tuple[str, int], str] = {}
    tuples = 0
    for path in _relation_files(folder):
        for xmin, xmax, multi, data in heap_tuples(path.read_bytes()):
            tuples += 1
            found = [(account, k) for n, (account, k) in names.items() if n in data]
            if not found:
                continue
            accounts = {a for a, _ in found}
            if len(accounts) > 1:
                report.findings.append(
                    Finding("link", str(path), f"a tuple names IDs of {len(accounts)} accounts")
                )
            xids = [("xmin", xmin)] + ([("multi" if multi else "xmax", xmax)] if xmax else [])
            for xid in xids:
                by_xid.setdefault(xid, set()).update(accounts)
                where.setdefault(xid, str(path))
                if any(k for _, k in found):
                    keyed.add(xid)
    report.notes.append(f"{tuples} heap tuples (live and dead) parsed in {folder}")
    for xid, accounts in sorted(by_xid.items()):
        if len(accounts) > 1:
            how = " (by mailbox names: needs the key file)" if xid in keyed else ""
            report.findings.append(
                Finding(
                    "deposit",
                    where[xid],
                    f"transaction {xid[1]} ({xid[0]}) wrote rows for devices of "
                    f"{len(accounts)} accounts, pairing them{how}",
                )
            )


def _key_secrets(
    ring: KeyRing, seen: Inspection, now: float
) -> tuple[list[tuple[str, bytes]], list[str]]:
    import hashlib
    import hmac

    secrets = [("index key of the key file", ring.index_key)]
    for version in range(ring.version, max(ring.version, ring.version_at(now)) + 2):
        kek = ring.kek(version)
        wrap = hmac.new(kek, b"kluis-kek-wrap", hashlib.sha256).digest()
        secrets += [(f"KEK version {version}", kek), (f"wrapping key version {version}", wrap)]
    notes = []
    for epoch, version, wrapped in seen.storage_keys:
        try:
            secrets.append((f"storage key of epoch {epoch}", ring.unwrap(wrapped, epoch, version)))
        except StorageKeyError as exc:
            notes.append(str(exc))
    return secrets, notes


def audit_postgres(
    report: Report,
    database_url: str,
    pgdata: Path,
    *,
    key_file: Path | None = None,
    markers: Sequence[str] = (),
    raw: Sequence[tuple[str, bytes]] = (),
    secrets: Sequence[tuple[str, bytes]] = (),
    licences: Sequence[str] = (),
    expect_empty: bool = False,
    now: float | None = None,
) -> None:
    """Add the findings of the store at ``database_url`` whose server keeps ``pgdata``."""
    try:
        if not (pgdata / "PG_VERSION").is_file():
            raise LocalProtocolError(f"{pgdata} is not a PostgreSQL data directory")
        (pgdata / "PG_VERSION").read_bytes()
        list((pgdata / "base").iterdir())
    except PermissionError as exc:
        raise LocalProtocolError(
            f"cannot read {pgdata}: run the audit as its owner (postgres) or root"
        ) from exc
    now = time.time() if now is None else now
    try:
        seen = asyncio.run(inspect(database_url, int(now)))
    except ConnectionError as exc:
        raise LocalProtocolError(str(exc)) from exc
    report.notes.append(
        f"{seen.envelopes} stored envelopes; {len(seen.storage_keys)} live storage keys"
    )
    if seen.expired:
        report.findings.append(
            Finding("envelope", database_url, f"{seen.expired} expired envelopes kept")
        )
    if expect_empty and seen.envelopes:
        report.findings.append(
            Finding("envelope", database_url, f"{seen.envelopes} envelopes still stored")
        )
    folder = pgdata / "base" / str(seen.database_oid)
    others = [p for p in (pgdata / "base").iterdir() if p != folder]
    paths = [p for p in sorted(pgdata.iterdir()) if p.name != "base"] + [folder]
    report.notes.append(
        f"PostgreSQL data directory {pgdata}: this database is {folder.name}; "
        f"{len(others)} other databases' folders skipped"
    )

    codes = [normalise_licence(c) for c in licences]
    needles = [*raw, *((f"hash of licence {i + 1}", licence_hash(c)) for i, c in enumerate(codes))]
    names: dict[bytes, tuple[str, bool]] = {n.encode(): (a, False) for n, a in seen.owner.items()}
    key_secrets: list[tuple[str, bytes]] = []
    if key_file is not None:
        ring = KeyFile(key_file).load()
        key_secrets, notes = _key_secrets(ring, seen, now)
        report.notes += notes
        report.notes.append("the key file's keys and the live storage keys looked for")
        names |= {ring.mailbox(n).encode(): (a, True) for n, a in seen.owner.items()}
        tags = {ring.licence_tag(licence_hash(c)): i for i, c in enumerate(codes)}
        live = set(seen.licence_tags)
        for tag, i in tags.items():
            if tag in live:
                report.findings.append(
                    Finding("licence", database_url, f"licence {i + 1} is not redeemed")
                )
        needles += [(f"tag of licence {i + 1} (needs the key file)", t) for t, i in tags.items()]
    else:
        report.notes.append("no key file given: storage keys not looked for")
    scan_files(
        report,
        paths,
        [*markers, *codes],
        needles,
        [*secrets, *key_secrets],
        no_shapes=[pgdata / "pg_xact", pgdata / "pg_subtrans"],  # transaction status bitmaps
    )
    if folder.is_dir():
        scan_links(report, folder, names)
    else:
        report.notes.append(f"no folder {folder}: is this the server's data directory?")
