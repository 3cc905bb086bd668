"""Attachments on several nodes: the rules of ``server/blobs.py`` over a shared ledger and folder.

Theory of operation: behind a load balancer, a device asks for a ticket over its WebSocket on
one node and may do the HTTP transfer on another; a blob uploaded through one node is fetched
through any. So nothing about a blob lives in one node's memory: tickets, reservations, records
and who fetched what are in Redis (``server/blob_ledger.py``, one Lua script per rule, atomic
across nodes), and the ciphertext files are in one folder every node mounts (``--blob-dir``:
NFS, CephFS; ``server/blob_files.py``), written under a temporary name and renamed whole.

- Redis never holds a device ID: the ledger names a device by a tag, HMAC(the storage key
  file's index key, device ID), so a copy of Redis does not say which device sent or fetched
  which blob without the key file.
- A ticket request checks size and recipients here, then reserves the room against the
  device's quota and the deployment's (``blob_quota_bytes``, ``blob_store_bytes``) and stores
  the ticket in one script. Whichever node gets the HTTP request takes the ticket (deleting
  it: single use across the deployment).
- A completed download is recorded in Redis; the confirmation (on any node) counts each device
  once; the one that reaches zero drops the record (every node then answers "unknown blob")
  and renames the file to ``.del-<id>``.
- A deleted file is not shredded at once: a download that began on another node before the
  deletion may still be reading it. The sweep shreds ``.del`` (and abandoned ``.part``) files
  once they are older than the longest transfer allowed (``blob_ticket_ttl_s`` +
  ``blob_idle_timeout_s`` + ``max_blob_bytes`` / ``blob_min_bytes_per_s``). The sweep runs on
  one node per period (a Redis lock); it deletes expired blobs, releases reservations whose
  transfer never came, and counts the deployment's bytes again from the folder.

The single-node default (no ``--redis``) keeps ``BlobService`` as it was: memory and a local
folder, no await on Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from kluis.errors import (
    BlobTooLarge,
    MalformedFrame,
    QuotaExceeded,
    RateLimited,
    ServerError,
    TicketInvalid,
    UnknownBlob,
)
from kluis.protocol import frames as f
from kluis.server.blob_files import BlobFiles, Header
from kluis.server.blob_ledger import BlobLedger
from kluis.server.blobs import TRANSFER_GRACE_S, BlobService, Download, Ticket, _Blob
from kluis.server.config import Limits
from kluis.server.ratelimit import SharedBuckets

_HOUR = 3600


class SharedBlobService(BlobService):
    """:class:`BlobService` whose state is the deployment's: ``ledger`` and a shared folder."""

    def __init__(
        self,
        files: BlobFiles,
        limits: Limits,
        clock: Callable[[], float],
        ledger: BlobLedger,
        tag_key: Callable[[], bytes],
        shared: SharedBuckets | None = None,
        sweep_period_s: float = 60.0,
    ) -> None:
        super().__init__(files, limits, clock, shared)
        self.ledger = ledger
        self._sweep_period_s = sweep_period_s
        self._tag_key_source = tag_key
        self._tag_key: bytes | None = None

    @classmethod
    def shared(
        cls,
        root: Path,
        limits: Limits,
        clock: Callable[[], float],
        ledger: BlobLedger,
        tag_key: Callable[[], bytes],
        buckets: SharedBuckets | None = None,
        sweep_period_s: float = 60.0,
    ) -> SharedBlobService:
        """No scan at start-up: other nodes may be writing; the sweep cleans up by age.
        ``tag_key``: the deployment's secret the ledger's device tags are made with, read at
        the first use (the storage key file's index key, made when the store first opens)."""
        return cls(BlobFiles(root), limits, clock, ledger, tag_key, buckets, sweep_period_s)

    def _tag(self, device: str) -> str:
        """What Redis knows of a device: HMAC(deployment secret, device ID), 128 bits."""
        if self._tag_key is None:
            self._tag_key = self._tag_key_source()
        mac = hmac.new(self._tag_key, b"kluis-blob\x00" + device.encode(), "sha256")
        return mac.hexdigest()[:32]

    # ---- limits derived from the configuration ------------------------------------------------

    def _transfer_s(self, size: int) -> float:
        """The longest an HTTP transfer of ``size`` bytes may last (``server/blob_http.py``)."""
        limits = self.limits
        return (
            limits.blob_idle_timeout_s
            + TRANSFER_GRACE_S
            + size / max(1, limits.blob_min_bytes_per_s)
        )

    @property
    def _stale_s(self) -> float:
        """After this long, no transfer can still be using a ``.part`` or ``.del`` file."""
        return self.limits.blob_ticket_ttl_s + self._transfer_s(self.limits.max_blob_bytes)

    # ---- tickets ------------------------------------------------------------------------------

    async def answer(
        self, device: str, frame: f.BlobUpload | f.BlobDownload | f.BlobFetched
    ) -> f.ServerFrame:
        if isinstance(frame, f.BlobFetched):
            await self.confirm(device, frame.id)
            return f.Done(rid=frame.rid)
        buckets = self._buckets
        ok = await buckets.take_shared(device) if buckets.shared else buckets.get(device).take()
        if not ok:
            raise RateLimited("too many blob tickets; slow down")
        limits = self.limits
        tag = self._tag(device)
        ticket = secrets.token_urlsafe(32)
        digest = hashlib.sha256(ticket.encode()).hexdigest()
        ttl_ms = limits.blob_ticket_ttl_s * 1000
        if isinstance(frame, f.BlobUpload):
            size, recipients = frame.size, frame.recipients
            self._check_upload(size, recipients)
            blob_id = secrets.token_hex(16)
            usage_ms = int((limits.blob_ttl_s + _HOUR + self._stale_s) * 1000)
            reserve = (blob_id, size, limits.blob_quota_bytes, limits.blob_store_bytes, usage_ms)
            value = f"{blob_id} u {size} {recipients} {tag}"
            code = await self.ledger.issue(
                digest, value, tag, ttl_ms, limits.max_blob_tickets, reserve
            )
        else:
            blob_id = frame.id
            found = await self._record(blob_id)
            if found is None or found[1] <= self._clock():
                raise UnknownBlob("no such attachment (never uploaded, fetched by all, or expired)")
            size = found[0]
            value = f"{blob_id} d {size} 0 {tag}"
            code = await self.ledger.issue(digest, value, tag, ttl_ms, limits.max_blob_tickets)
        if code == "quota":
            raise QuotaExceeded(
                f"this device's attachments would exceed {limits.blob_quota_bytes} bytes "
                "until recipients fetch them or they expire"
            )
        if code == "room":
            raise QuotaExceeded("this server has no room for the attachment now")
        if code == "tickets":
            raise RateLimited("too many unused blob tickets; use or let them expire")
        expires_at = int(self._clock() + limits.blob_ticket_ttl_s)
        return f.BlobTicket(
            rid=frame.rid, id=blob_id, ticket=ticket, size=size, expires_at=expires_at
        )

    def _check_upload(self, size: int, recipients: int) -> None:
        limits = self.limits
        if size > limits.max_blob_bytes:
            raise BlobTooLarge(
                f"an attachment of {size} bytes exceeds this server's limit of "
                f"{limits.max_blob_bytes} bytes",
                limit=limits.max_blob_bytes,
            )
        if not 1 <= recipients <= limits.max_blob_recipients:
            raise MalformedFrame(f"a blob has 1 to {limits.max_blob_recipients} recipients")

    async def _record(self, blob_id: str) -> tuple[int, int] | None:
        """(size, expiry) of a live blob; a record Redis lost is restored from the file."""
        found = await self.ledger.record(blob_id)
        if found is None:
            header = await asyncio.to_thread(self._header, blob_id)
            if header is None:
                return None
            await self.ledger.restore(blob_id, header.size, header.expires_at, header.remaining)
            found = await self.ledger.record(blob_id)  # None if it was being deleted
        return found

    def _header(self, blob_id: str) -> Header | None:
        return BlobFiles.read_header(self.files.path(blob_id))

    async def claim(self, ticket: str, blob_id: str, *, upload: bool) -> Ticket:
        digest = hashlib.sha256(ticket.encode()).hexdigest()
        base_ms = int((self.limits.blob_idle_timeout_s + TRANSFER_GRACE_S) * 1000)
        rate = max(1, self.limits.blob_min_bytes_per_s)
        value = await self.ledger.take(digest, blob_id, upload, base_ms, rate)
        if value is None:
            raise TicketInvalid("no valid ticket for this transfer")
        _, _, size, recipients, tag = value.split(" ", 4)
        return Ticket(
            blob_id=blob_id,
            upload=upload,
            device=tag,  # the ledger's tag: all a transfer needs to know of its device
            size=int(size),
            recipients=int(recipients),
            expires_at=self._clock() + self.limits.blob_ticket_ttl_s,
        )

    async def cancel(self, t: Ticket) -> None:
        if t.upload:
            await self._unreserve(t)

    async def _unreserve(self, t: Ticket) -> None:
        # Redis not answering: the reservation lapses at its deadline and a sweep releases it.
        with contextlib.suppress(ServerError):
            await self.ledger.release(t.blob_id)

    # ---- transfers ----------------------------------------------------------------------------

    async def _uploaded(self, t: Ticket, part: Path, out: BinaryIO) -> None:
        now = self._clock()
        expires_at = math.ceil((now + self.limits.blob_ttl_s) / _HOUR) * _HOUR
        header = Header(size=t.size, expires_at=expires_at, remaining=t.recipients)
        await asyncio.to_thread(self.files.commit, part, out, t.blob_id, header)
        usage_ms = int((self.limits.blob_ttl_s + _HOUR + self._stale_s) * 1000)
        try:
            await self.ledger.commit(
                t.blob_id, t.size, expires_at, t.recipients, t.device, usage_ms
            )
        except ServerError:  # no record: the upload failed, so the file must not stay either
            await asyncio.to_thread(self.files.discard, t.blob_id)
            raise

    async def start_download(self, t: Ticket) -> Download:
        found = await self.ledger.record(t.blob_id)
        if found is None:
            raise UnknownBlob("the attachment is gone")
        try:
            source = await asyncio.to_thread(self.files.open, t.blob_id)
        except FileNotFoundError as exc:
            raise UnknownBlob("the attachment is gone") from exc
        blob = _Blob(found[0], found[1], 0, uploader=None, readers=1)
        return Download(self, t, blob, source)

    async def _reader_done(self, blob_id: str, blob: _Blob) -> None:
        return  # a deleted file waits for the sweep, long enough for every reader

    async def completed(self, download: Download) -> None:
        if download.sent == download.ticket.size:
            await self.ledger.fetched(download.ticket.blob_id, download.ticket.device)

    # ---- deletion -----------------------------------------------------------------------------

    async def confirm(self, device: str, blob_id: str) -> None:
        tag = self._tag(device)
        answer = await self.ledger.confirm(blob_id, tag)
        if answer == "unknown" and await self._record(blob_id) is not None:
            answer = await self.ledger.confirm(blob_id, tag)  # restored after a Redis restart
        if answer == "unknown":
            raise UnknownBlob("no such attachment (never uploaded, fetched by all, or expired)")
        if answer == "unfetched":
            raise TicketInvalid("confirm a fetch only once this device has completed it")
        if answer == "again":
            return
        if answer == "0":
            await asyncio.to_thread(self.files.discard, blob_id)
        else:  # kept in the header too, so that a Redis restart loses less
            await asyncio.to_thread(self._set_remaining, blob_id, int(answer))

    def _set_remaining(self, blob_id: str, remaining: int) -> None:
        with contextlib.suppress(FileNotFoundError):  # deleted meanwhile by another node
            self.files.set_remaining(blob_id, remaining)

    async def sweep(self) -> int:
        """On one node per period: release lapsed reservations, delete expired blobs, shred
        old ``.part`` and ``.del`` files, count the deployment's bytes again."""
        if not await self.ledger.sweep_turn(max(1, int(self._sweep_period_s * 900))):
            return 0
        await self.ledger.lapse()
        now = self._clock()
        stale_before = time.time() - self._stale_s
        found = await asyncio.to_thread(self.files.survey, stale_before)
        expired = 0
        kept = 0
        for blob_id, header in found:
            if header.expires_at <= now:
                await self.ledger.drop(blob_id)
                await asyncio.to_thread(self.files.discard, blob_id)
                expired += 1
            else:
                kept += header.size
        await self.ledger.recount(kept)
        return expired
