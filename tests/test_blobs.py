"""server/blobs.py and blob_files.py in-process, with an injected clock: expiry, tickets,
quotas, restart, and the blob frames through the connection handler (Hypothesis)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given

from kluis.errors import BlobTooLarge, QuotaExceeded, RateLimited, TicketInvalid, UnknownBlob
from kluis.protocol import frames as f
from kluis.server.blob_files import HEADER_BYTES
from kluis.server.blobs import BlobService
from kluis.server.config import DAY, Limits
from tests.test_fuzz import (  # noqa: F401 - fixtures
    BUDGET,
    _answer,
    frame_dicts,
    loop,
    pack,
    server,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def service(tmp_path: Path, clock: Clock, **limits: Any) -> BlobService:
    return BlobService.open(tmp_path / "blobs", Limits(**limits), clock)


async def put(svc: BlobService, device: str, data: bytes, recipients: int = 1) -> str:
    ticket, t = svc.request_upload(device, len(data), recipients)
    upload = await svc.start_upload(svc.take_ticket(ticket, t.blob_id, upload=True))
    await upload.write(data)
    await upload.commit()
    return t.blob_id


async def fetch(svc: BlobService, device: str, blob_id: str) -> bytes:
    ticket, _ = svc.request_download(device, blob_id)
    download = await svc.start_download(svc.take_ticket(ticket, blob_id, upload=False))
    out = b""
    while data := await download.read():
        out += data
    download.completed()
    await download.close()
    return out


def files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "blobs").iterdir())


async def test_expiry_sweep_deletes_blobs_and_frees_quota(tmp_path: Path) -> None:
    clock = Clock()
    svc = service(tmp_path, clock, blob_quota_bytes=100)
    blob_id = await put(svc, "dev", b"c" * 60)
    assert files(tmp_path) == [blob_id]
    with pytest.raises(QuotaExceeded):
        svc.request_upload("dev", 60, 1)
    clock.now += 30 * DAY - 1
    assert await svc.sweep() == 0  # expiry is rounded up to the hour, never earlier
    clock.now += 3601
    assert await svc.sweep() == 1
    assert files(tmp_path) == []
    with pytest.raises(UnknownBlob):
        svc.request_download("peer", blob_id)
    svc.request_upload("dev", 60, 1)  # room again


async def test_tickets_expire_are_single_use_and_bounded(tmp_path: Path) -> None:
    clock = Clock()
    svc = service(tmp_path, clock, max_blob_tickets=2, blob_quota_bytes=100)
    t1, a = svc.request_upload("dev", 40, 1)
    svc.request_upload("dev", 40, 1)
    with pytest.raises(QuotaExceeded):  # the unused tickets reserve their room
        svc.request_upload("dev", 21, 1)
    with pytest.raises(RateLimited):  # and a device holds at most two unused tickets
        svc.request_upload("dev", 20, 1)
    clock.now += 301
    with pytest.raises(TicketInvalid):  # too late
        svc.take_ticket(t1, a.blob_id, upload=True)
    await svc.sweep()
    t3, c = svc.request_upload("dev", 100, 1)  # expired tickets gave their room back
    svc.take_ticket(t3, c.blob_id, upload=True)
    with pytest.raises(TicketInvalid):
        svc.take_ticket(t3, c.blob_id, upload=True)
    with pytest.raises(BlobTooLarge):
        svc.request_upload("dev", Limits().max_blob_bytes + 1, 1)


async def test_confirmations_count_once_per_device_after_a_completed_fetch(
    tmp_path: Path,
) -> None:
    clock = Clock()
    svc = service(tmp_path, clock)
    blob_id = await put(svc, "alice", b"ciphertext" * 100, recipients=2)
    with pytest.raises(TicketInvalid):
        await svc.confirm("bob", blob_id)  # not fetched
    assert await fetch(svc, "bob", blob_id) == b"ciphertext" * 100
    for _ in range(3):
        await svc.confirm("bob", blob_id)
    assert files(tmp_path) == [blob_id]
    # A restart forgets who fetched, but the disk keeps how many fetches remain (one).
    svc = service(tmp_path, clock)
    assert len(svc) == 1
    await fetch(svc, "carol", blob_id)
    await svc.confirm("carol", blob_id)
    assert files(tmp_path) == []


async def test_a_deletion_waits_for_a_download_in_progress(tmp_path: Path) -> None:
    svc = service(tmp_path, Clock())
    data = bytes(3 * 1024 * 1024)
    blob_id = await put(svc, "alice", data, recipients=1)
    await fetch(svc, "bob", blob_id)
    ticket, _ = svc.request_download("eve", blob_id)
    slow = await svc.start_download(svc.take_ticket(ticket, blob_id, upload=False))
    first = await slow.read()
    await svc.confirm("bob", blob_id)  # the last recipient: doomed, but eve is reading
    with pytest.raises(UnknownBlob):
        svc.request_download("mallory", blob_id)
    rest = b""
    while piece := await slow.read():
        rest += piece
    assert first + rest == data
    await slow.close()
    assert files(tmp_path) == []


async def test_start_up_shreds_leftovers_and_damaged_files(tmp_path: Path) -> None:
    clock = Clock()
    svc = service(tmp_path, clock)
    blob_id = await put(svc, "alice", b"x" * 10)
    folder = tmp_path / "blobs"
    (folder / ".part-0123").write_bytes(bytes(HEADER_BYTES) + b"half")  # a crash mid-upload
    (folder / f".del-{'e' * 32}").write_bytes(b"doomed")  # a crash mid-deletion
    (folder / ("f" * 32)).write_bytes(b"not a blob")
    (folder / "../blobs/stray").write_bytes(b"?")
    assert len(files(tmp_path)) == 5
    svc = service(tmp_path, clock)
    assert files(tmp_path) == [blob_id]
    assert (folder / blob_id).stat().st_size == HEADER_BYTES + 10


async def test_an_upload_of_the_wrong_length_leaves_nothing(tmp_path: Path) -> None:
    svc = service(tmp_path, Clock(), blob_quota_bytes=10)
    ticket, t = svc.request_upload("dev", 10, 1)
    upload = await svc.start_upload(svc.take_ticket(ticket, t.blob_id, upload=True))
    with pytest.raises(BlobTooLarge):
        await upload.write(b"x" * 11)
    await upload.abort()
    ticket, t = svc.request_upload("dev", 10, 1)  # its room was given back
    upload = await svc.start_upload(svc.take_ticket(ticket, t.blob_id, upload=True))
    await upload.write(b"x" * 9)
    with pytest.raises(Exception, match="ended after 9 of 10"):
        await upload.commit()
    await upload.abort()
    assert files(tmp_path) == []


BLOB_FRAMES = (f.BlobUpload, f.BlobDownload, f.BlobFetched)


@BUDGET
@given(frame_dicts(BLOB_FRAMES))
def test_blob_frames_of_any_shape_get_typed_answers(
    server: Any,  # noqa: F811 - the fixture imported above
    loop: asyncio.AbstractEventLoop,  # noqa: F811
    obj: dict[str, Any],
) -> None:
    _state, conn, _device = server
    reply = _answer(loop, conn, pack(obj))
    assert isinstance(reply, f.Error | f.BlobTicket | f.Done)


def test_blob_ticket_frames_round_trip() -> None:
    frame = f.BlobTicket(rid=1, id="a" * 32, ticket="t", size=5, expires_at=9)
    assert f.decode_server_frame(f.encode(frame)) == frame
    for bad in ("A" * 32, "a" * 31, "../" + "a" * 29):
        with pytest.raises(Exception, match="undecodable"):
            f.decode_client_frame(f.encode(f.BlobDownload(rid=1, id=bad)))
