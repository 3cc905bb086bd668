"""Attachments on the server: opaque ciphertext blobs, their tickets, quotas, expiry and deletion.

Theory of operation: a logged-in device asks over the WebSocket for a ticket
(``BlobUpload{size, recipients}`` or ``BlobDownload{id}``) and gets ``BlobTicket{id, ticket}``;
it then does ONE HTTP ``PUT`` or ``GET`` of ``/v1/blobs/{id}`` with ``Authorization: Bearer
{ticket}`` (``server/blob_http.py``). All refusals an uploader can know in advance (size over
``max_blob_bytes``, its quota, the node's room) come at the ticket request, before a byte is
sent. A ticket is single-use, bound to one blob, one direction and one device, and expires
after ``blob_ticket_ttl_s``; tickets are looked up by their SHA-256, and a blob ID is 128 random
bits, so neither an ID nor a ticket can be guessed, and no path ever comes from a client.

Deletion: the uploader says how many devices will fetch the blob. A device that has completed a
download confirms it (``BlobFetched``); each device counts once, and only after a completed
download. When the count is reached, or at expiry (``blob_ttl_s``, swept), the file is renamed
away, zeroed and unlinked. Which devices fetched or confirmed is kept in memory only; the disk
holds, per blob, its size, its expiry (to the hour) and how many fetches remain, never a device
or an account. The uploader of each blob is also known in memory only (for its quota): after a
restart the blobs already kept count against the node's total (``blob_store_bytes``) but no
device's quota. A download in progress holds its blob: a deletion waits for it to end.

This is the single-node service: its state is this process's memory and its folder. With
several nodes (``--redis``), ``server/blob_shared.py`` subclasses it and keeps the same rules
over Redis and a folder the nodes share; the HTTP side calls the async hooks (:meth:`claim`,
:meth:`cancel`, :meth:`completed`) that both implement.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from kluis.errors import (
    BlobTooLarge,
    MalformedFrame,
    QuotaExceeded,
    RateLimited,
    TicketInvalid,
    UnknownBlob,
)
from kluis.protocol import frames as f
from kluis.server.blob_files import BlobFiles, Header
from kluis.server.config import Limits
from kluis.server.ratelimit import BucketMap, SharedBuckets

_HOUR = 3600
TRANSFER_GRACE_S = 5.0  # added to the minimum-rate deadline of a transfer (server/blob_http.py)
_WRITE_BYTES = 1024 * 1024  # an upload is written to disk in pieces of this size
READ_BYTES = 1024 * 1024  # and a download read in pieces of this size


@dataclass(slots=True)
class _Blob:
    size: int
    expires_at: int
    remaining: int
    uploader: str | None  # memory only; None for blobs found at start-up
    fetched: set[str] = field(default_factory=set)  # completed downloads, memory only
    confirmed: set[str] = field(default_factory=set)  # memory only
    readers: int = 0
    doomed: bool = False  # to delete once the last reader is done


@dataclass(frozen=True, slots=True)
class Ticket:
    blob_id: str
    upload: bool
    device: str
    size: int
    recipients: int
    expires_at: float


def _digest(ticket: str) -> bytes:
    return hashlib.sha256(ticket.encode()).digest()


class BlobService:
    """The rules over the blob folder. Time is injected; the file work runs on threads."""

    def __init__(
        self,
        files: BlobFiles,
        limits: Limits,
        clock: Callable[[], float],
        shared: SharedBuckets | None = None,
    ) -> None:
        self.files = files
        self.limits = limits
        self._clock = clock
        self._blobs: dict[str, _Blob] = {}
        self._tickets: dict[bytes, Ticket] = {}
        self._per_device: dict[str, int] = {}  # unused tickets per device
        self._usage: dict[str, int] = {}  # live and reserved bytes per uploading device
        self._stored = 0  # live and reserved bytes on this node
        self._buckets = BucketMap(
            limits.blob_ticket_rate_per_s, limits.blob_ticket_burst, clock, shared, "blob"
        )

    @classmethod
    def open(
        cls,
        root: Path,
        limits: Limits,
        clock: Callable[[], float],
        shared: SharedBuckets | None = None,
    ) -> BlobService:
        """Read the blob folder (blocking; at start-up). ``shared``: the deployment's ticket
        buckets (several nodes, server/ratelimit.py)."""
        service = cls(BlobFiles(root), limits, clock, shared)
        for blob_id, header in service.files.scan():
            service._blobs[blob_id] = _Blob(
                header.size, header.expires_at, header.remaining, uploader=None
            )
            service._stored += header.size
        return service

    def __len__(self) -> int:
        return len(self._blobs)

    # ---- tickets (WebSocket side) -------------------------------------------------------------

    async def answer(
        self, device: str, frame: f.BlobUpload | f.BlobDownload | f.BlobFetched
    ) -> f.ServerFrame:
        """The answer to one blob request of a logged-in ``device``."""
        if isinstance(frame, f.BlobFetched):
            await self.confirm(device, frame.id)
            return f.Done(rid=frame.rid)
        if self._buckets.shared is not None and not await self._buckets.take_shared(device):
            raise RateLimited("too many blob tickets; slow down")  # across the nodes
        if isinstance(frame, f.BlobUpload):
            ticket, t = self.request_upload(device, frame.size, frame.recipients)
        else:
            ticket, t = self.request_download(device, frame.id)
        return f.BlobTicket(
            rid=frame.rid, id=t.blob_id, ticket=ticket, size=t.size, expires_at=int(t.expires_at)
        )

    def _admit(self, device: str) -> None:
        if self._per_device.get(device, 0) >= self.limits.max_blob_tickets:
            raise RateLimited("too many unused blob tickets; use or let them expire")
        if self._buckets.shared is None and not self._buckets.get(device).take():
            raise RateLimited("too many blob tickets; slow down")

    def _issue(self, t: Ticket) -> str:
        ticket = secrets.token_urlsafe(32)
        self._tickets[_digest(ticket)] = t
        self._per_device[t.device] = self._per_device.get(t.device, 0) + 1
        return ticket

    def request_upload(self, device: str, size: int, recipients: int) -> tuple[str, Ticket]:
        limits = self.limits
        if size > limits.max_blob_bytes:
            raise BlobTooLarge(
                f"an attachment of {size} bytes exceeds this server's limit of "
                f"{limits.max_blob_bytes} bytes",
                limit=limits.max_blob_bytes,
            )
        if not 1 <= recipients <= limits.max_blob_recipients:
            raise MalformedFrame(f"a blob has 1 to {limits.max_blob_recipients} recipients")
        if self._usage.get(device, 0) + size > limits.blob_quota_bytes:
            raise QuotaExceeded(
                f"this device's attachments would exceed {limits.blob_quota_bytes} bytes "
                "until recipients fetch them or they expire"
            )
        if self._stored + size > limits.blob_store_bytes:
            raise QuotaExceeded("this server has no room for the attachment now")
        self._admit(device)
        blob_id = secrets.token_hex(16)
        while blob_id in self._blobs:  # pragma: no cover - 128 random bits
            blob_id = secrets.token_hex(16)
        t = Ticket(
            blob_id=blob_id,
            upload=True,
            device=device,
            size=size,
            recipients=recipients,
            expires_at=self._clock() + limits.blob_ticket_ttl_s,
        )
        self._reserve(device, size)
        return self._issue(t), t

    def request_download(self, device: str, blob_id: str) -> tuple[str, Ticket]:
        blob = self._blobs.get(blob_id)
        if blob is None or blob.doomed or blob.expires_at <= self._clock():
            raise UnknownBlob("no such attachment (never uploaded, fetched by all, or expired)")
        self._admit(device)
        t = Ticket(
            blob_id=blob_id,
            upload=False,
            device=device,
            size=blob.size,
            recipients=0,
            expires_at=self._clock() + self.limits.blob_ticket_ttl_s,
        )
        return self._issue(t), t

    def take_ticket(self, ticket: str, blob_id: str, *, upload: bool) -> Ticket:
        """The ticket for one HTTP transfer, used up; any mismatch is one answer."""
        key = _digest(ticket)
        t = self._tickets.get(key)
        if t is None or t.blob_id != blob_id or t.upload != upload:
            raise TicketInvalid("no valid ticket for this transfer")
        self._drop_ticket(key, t)
        if t.expires_at <= self._clock():
            if upload:
                self._release(t.device, t.size)
            raise TicketInvalid("no valid ticket for this transfer")
        return t

    async def claim(self, ticket: str, blob_id: str, *, upload: bool) -> Ticket:
        """:meth:`take_ticket` for the HTTP side (across nodes, ``server/blob_shared.py``, the
        ticket is in Redis)."""
        return self.take_ticket(ticket, blob_id, upload=upload)

    async def cancel(self, t: Ticket) -> None:
        """:meth:`cancel_upload` for the HTTP side."""
        self.cancel_upload(t)

    async def _unreserve(self, t: Ticket) -> None:
        """An upload that failed: give its reserved room back."""
        self._release(t.device, t.size)

    async def completed(self, download: Download) -> None:
        """Every byte of ``download`` was handed to the transport: its device may confirm."""
        download.completed()

    def cancel_upload(self, t: Ticket) -> None:
        """An upload ticket taken but refused before its transfer began: free its room."""
        if t.upload:
            self._release(t.device, t.size)

    def _drop_ticket(self, key: bytes, t: Ticket) -> None:
        del self._tickets[key]
        left = self._per_device.get(t.device, 0) - 1
        if left > 0:
            self._per_device[t.device] = left
        else:
            self._per_device.pop(t.device, None)

    def _reserve(self, device: str, size: int) -> None:
        self._usage[device] = self._usage.get(device, 0) + size
        self._stored += size

    def _release(self, device: str | None, size: int) -> None:
        self._stored -= size
        if device is not None:
            left = self._usage.get(device, 0) - size
            if left > 0:
                self._usage[device] = left
            else:
                self._usage.pop(device, None)

    # ---- transfers (HTTP side) ----------------------------------------------------------------

    async def start_upload(self, t: Ticket) -> Upload:
        part, out = await asyncio.to_thread(self.files.create_part)
        return Upload(self, t, part, out)

    async def _uploaded(self, t: Ticket, part: Path, out: BinaryIO) -> None:
        now = self._clock()
        expires_at = math.ceil((now + self.limits.blob_ttl_s) / _HOUR) * _HOUR
        header = Header(size=t.size, expires_at=expires_at, remaining=t.recipients)
        await asyncio.to_thread(self.files.commit, part, out, t.blob_id, header)
        self._blobs[t.blob_id] = _Blob(t.size, expires_at, t.recipients, uploader=t.device)

    async def start_download(self, t: Ticket) -> Download:
        blob = self._blobs.get(t.blob_id)
        if blob is None or blob.doomed:
            raise UnknownBlob("the attachment is gone")
        source = await asyncio.to_thread(self.files.open, t.blob_id)
        blob.readers += 1
        return Download(self, t, blob, source)

    async def _reader_done(self, blob_id: str, blob: _Blob) -> None:
        blob.readers -= 1
        if blob.doomed and blob.readers == 0:
            await asyncio.to_thread(self.files.delete, blob_id)

    # ---- deletion -----------------------------------------------------------------------------

    async def confirm(self, device: str, blob_id: str) -> None:
        """``device`` has fetched ``blob_id`` in full; delete it when every recipient has."""
        blob = self._blobs.get(blob_id)
        if blob is None or blob.doomed:
            raise UnknownBlob("no such attachment (never uploaded, fetched by all, or expired)")
        if device in blob.confirmed:
            return  # each device counts once, however often it says so
        if device not in blob.fetched:
            raise TicketInvalid("confirm a fetch only once this device has completed it")
        blob.fetched.discard(device)
        blob.confirmed.add(device)
        blob.remaining -= 1
        if blob.remaining <= 0:
            await self._delete(blob_id, blob)
        else:
            await asyncio.to_thread(self.files.set_remaining, blob_id, blob.remaining)

    async def _delete(self, blob_id: str, blob: _Blob) -> None:
        del self._blobs[blob_id]
        self._release(blob.uploader, blob.size)
        blob.doomed = True
        if blob.readers == 0:
            await asyncio.to_thread(self.files.delete, blob_id)

    async def sweep(self) -> int:
        """Forget expired tickets and delete expired blobs; return how many blobs expired."""
        now = self._clock()
        for key, t in [(k, t) for k, t in self._tickets.items() if t.expires_at <= now]:
            self._drop_ticket(key, t)
            if t.upload:
                self._release(t.device, t.size)
        expired = [(i, b) for i, b in self._blobs.items() if b.expires_at <= now]
        for blob_id, blob in expired:
            await self._delete(blob_id, blob)
        return len(expired)


class Upload:
    """One PUT in progress: bytes in, written to a part file in pieces; whole or nothing."""

    __slots__ = ("_buf", "_done", "_out", "_part", "_service", "received", "ticket")

    def __init__(self, service: BlobService, t: Ticket, part: Path, out: BinaryIO) -> None:
        self._service, self.ticket, self._part, self._out = service, t, part, out
        self._buf = bytearray()
        self.received = 0
        self._done = False

    async def write(self, data: bytes) -> None:
        """Take ``data``; raise BlobTooLarge past the ticket's size (the caller cuts the PUT)."""
        self.received += len(data)
        if self.received > self.ticket.size:
            raise BlobTooLarge(f"more bytes than the {self.ticket.size} the ticket was for")
        self._buf += data
        if len(self._buf) >= _WRITE_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        buf, self._buf = bytes(self._buf), bytearray()
        await asyncio.to_thread(self._service.files.write, self._out, buf)

    async def commit(self) -> None:
        if self.received != self.ticket.size:
            raise MalformedFrame(
                f"the upload ended after {self.received} of {self.ticket.size} bytes"
            )
        await self._flush()
        await self._service._uploaded(self.ticket, self._part, self._out)
        self._done = True  # only now: if anything above failed, abort() cleans up

    async def abort(self) -> None:
        """Drop the part file and give the reserved room back (idempotent)."""
        if self._done:
            return
        self._done = True
        self._buf = bytearray()
        await self._service._unreserve(self.ticket)
        await asyncio.to_thread(self._service.files.abort, self._part, self._out)


class Download:
    """One GET in progress: the blob's ciphertext in pieces; :meth:`completed` once all left."""

    __slots__ = ("_blob", "_closed", "_service", "_source", "sent", "ticket")

    def __init__(self, service: BlobService, t: Ticket, blob: _Blob, source: BinaryIO) -> None:
        self._service, self.ticket, self._blob, self._source = service, t, blob, source
        self.sent = 0
        self._closed = False

    async def read(self) -> bytes:
        data: bytes = await asyncio.to_thread(self._source.read, READ_BYTES)
        self.sent += len(data)
        return data

    def completed(self) -> None:
        """Every byte was handed to the transport: this device may now confirm the fetch."""
        if self.sent == self._blob.size and not self._blob.doomed:
            self._blob.fetched.add(self.ticket.device)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._source.close)
        await self._service._reader_done(self.ticket.blob_id, self._blob)
