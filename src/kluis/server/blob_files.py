"""Blobs on disk: one file per blob under ``data/blobs/``, named by its random ID.

Theory of operation: an upload is written to a fresh ``.part-<random>`` file, fsynced, then
renamed to ``<id>`` (atomic: a blob is whole or absent), and the folder is fsynced. Each file
starts with a 32-byte header: magic, format version, ciphertext size, expiry (unix seconds,
rounded up to the hour) and how many fetches remain; the ciphertext follows. Nothing names a
device or an account. The file's mtime is set to the hour too (ctime cannot be set: see
docs). A deleted blob is first renamed to ``.del-<id>`` (no longer found), then overwritten
with zeros, fsynced and unlinked. At start-up, ``.part`` and ``.del`` leftovers of a crash and
any file with a bad header are shredded the same way.

A folder shared by several nodes (``server/blob_shared.py``) is never scanned that way, since
another node may be writing a ``.part`` file or reading a deleted blob: :meth:`discard` only
renames a blob to ``.del-<id>`` and stamps the time, and :meth:`survey` (one node's periodic
sweep) shreds ``.part`` and ``.del`` files older than the longest transfer allowed. A rename
is atomic on one file system, NFS and CephFS included: a blob is whole or absent on every node.

Every function here blocks: ``server/blobs.py`` calls them on a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_MAGIC = b"KLBL"
_VERSION = 1
_HEADER = struct.Struct(">4sB3xQQI4x")  # magic, version, size, expires_at, remaining
HEADER_BYTES = _HEADER.size
_REMAINING_AT = 4 + 1 + 3 + 8 + 8
_ID = re.compile(r"[0-9a-f]{32}")
_ZEROS = bytes(1024 * 1024)


@dataclass(frozen=True, slots=True)
class Header:
    size: int  # ciphertext bytes after the header
    expires_at: int
    remaining: int  # fetches still expected


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobFiles:
    """The blob folder. IDs reaching here are 32 lowercase hex characters (checked again)."""

    def __init__(self, root: Path) -> None:
        self.root = root  # made on the first upload: a node without attachments has none

    def path(self, blob_id: str) -> Path:
        if not _ID.fullmatch(blob_id):  # no path ever comes from a client unchecked
            raise ValueError("not a blob id")
        return self.root / blob_id

    # ---- writing ----------------------------------------------------------------------------

    def create_part(self) -> tuple[Path, BinaryIO]:
        """A new temporary file, its header left blank until :meth:`commit`."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.root / f".part-{secrets.token_hex(16)}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        out = os.fdopen(fd, "wb", buffering=0)
        out.write(bytes(HEADER_BYTES))
        return path, out

    @staticmethod
    def write(out: BinaryIO, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = out.write(view)
            view = view[n or 0 :]

    def commit(self, part: Path, out: BinaryIO, blob_id: str, header: Header) -> None:
        """Write the header, make the file durable and give it its name."""
        out.seek(0)
        self.write(
            out,
            _HEADER.pack(_MAGIC, _VERSION, header.size, header.expires_at, header.remaining),
        )
        os.fsync(out.fileno())
        out.close()
        stamp = max(0, header.expires_at - 3600)  # the hour, not the second, of the upload
        os.utime(part, (stamp, stamp))
        os.replace(part, self.path(blob_id))
        _fsync_dir(self.root)

    def abort(self, part: Path, out: BinaryIO) -> None:
        with contextlib.suppress(OSError):
            out.close()
        self._shred(part)

    def set_remaining(self, blob_id: str, remaining: int) -> None:
        fd = os.open(self.path(blob_id), os.O_WRONLY)
        try:
            os.pwrite(fd, struct.pack(">I", remaining), _REMAINING_AT)
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---- reading ----------------------------------------------------------------------------

    def open(self, blob_id: str) -> BinaryIO:
        """The blob's ciphertext, positioned after the header."""
        f = self.path(blob_id).open("rb", buffering=0)
        f.seek(HEADER_BYTES)
        return f

    def scan(self) -> list[tuple[str, Header]]:
        """Every blob kept, after shredding leftovers of a crash and damaged files."""
        found: list[tuple[str, Header]] = []
        if not self.root.is_dir():
            return found
        for entry in sorted(self.root.iterdir()):
            if not entry.is_file():
                continue
            header = self._read_header(entry) if _ID.fullmatch(entry.name) else None
            if header is None:
                self._shred(entry)
            else:
                found.append((entry.name, header))
        return found

    @staticmethod
    def read_header(path: Path) -> Header | None:
        """The header of the blob file at ``path``; None when it is not a whole blob."""
        return BlobFiles._read_header(path)

    @staticmethod
    def _read_header(path: Path) -> Header | None:
        try:
            with path.open("rb") as f:
                raw = f.read(HEADER_BYTES)
            size_on_disk = path.stat().st_size
        except OSError:
            return None
        if len(raw) != HEADER_BYTES:
            return None
        magic, version, size, expires_at, remaining = _HEADER.unpack(raw)
        if magic != _MAGIC or version != _VERSION or size_on_disk != HEADER_BYTES + size:
            return None
        return Header(size=size, expires_at=expires_at, remaining=remaining)

    # ---- deleting ---------------------------------------------------------------------------

    def delete(self, blob_id: str) -> None:
        """Rename (so it is no longer found), overwrite with zeros, fsync, unlink."""
        path = self.path(blob_id)
        doomed = self.root / f".del-{blob_id}"
        try:
            os.replace(path, doomed)
        except FileNotFoundError:
            return
        self._shred(doomed)

    # ---- a folder shared by several nodes ----------------------------------------------------

    def discard(self, blob_id: str) -> None:
        """Make the blob unreachable now (renamed to ``.del-<id>``, stamped with the time);
        :meth:`survey` shreds it once no transfer that began before can still be reading it.
        Idempotent: when two nodes discard one blob, one rename wins, the other finds nothing."""
        path = self.path(blob_id)
        doomed = self.root / f".del-{blob_id}"
        try:
            os.replace(path, doomed)
            os.utime(doomed)  # the time of deletion, for the survey
        except FileNotFoundError:
            return
        _fsync_dir(self.root)

    def survey(self, stale_before: float) -> list[tuple[str, Header]]:
        """Every whole blob; ``.part`` and ``.del`` files last touched before ``stale_before``
        (unix seconds) and damaged blob files are shredded on the way."""
        found: list[tuple[str, Header]] = []
        if not self.root.is_dir():
            return found
        for entry in self.root.iterdir():
            name = entry.name
            if _ID.fullmatch(name):
                header = self._read_header(entry)
                if header is not None:
                    found.append((name, header))
                elif entry.exists():  # damaged (a rename only ever brings whole files)
                    self._shred(entry)
            elif name.startswith((".part-", ".del-")):
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime < stale_before:
                        self._shred(entry)
        return found

    def _shred(self, path: Path) -> None:
        # Best effort below the file system (SSDs, copy-on-write, journals keep old blocks): the
        # real protection is that a blob is ciphertext under a key the server never saw.
        try:
            fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError:
            return
        try:
            left = os.fstat(fd).st_size
            while left > 0:
                n = os.write(fd, _ZEROS[: min(left, len(_ZEROS))])
                left -= n
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        _fsync_dir(self.root)
