"""Attachments end to end on a real server process on loopback, with real clients.

A 50 MB file round trip with both sides' memory measured; a blob damaged on the server's disk
refused; the blob gone from the data folder once every recipient fetched it; an oversized
upload refused before a byte is sent; tickets that cannot be misused; a slow upload cut.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from kluis.audit.storage import audit
from kluis.client.client import KluisClient
from kluis.crypto.attachment import CHUNK, ciphertext_size
from kluis.errors import (
    AttachmentCorrupt,
    BlobTooLarge,
    MalformedFrame,
    TicketInvalid,
    UnknownBlob,
)
from kluis.protocol import frames as f
from kluis.server.blob_files import HEADER_BYTES
from kluis.server.config import DAY
from tests.kluis_testing import ServerProcess, register

MB = 1000 * 1000


def blobs(server: ServerProcess) -> list[str]:
    folder = server.data / "blobs"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def write_random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            piece = os.urandom(min(left, 1 << 20))
            digest.update(piece)
            out.write(piece)
            left -= len(piece)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while piece := src.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        tmp_path / "limited",
        "--limit",
        f"max_blob_bytes={2 * MB}",
        "--limit",
        "blob_idle_timeout_s=1",
        "--limit",
        "max_blob_recipients=100",
    )
    srv.start()
    yield srv
    srv.stop()


async def test_50mb_attachment_round_trip_with_memory_far_below_the_file(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    source = tmp_path / "film.bin"
    expected = write_random_file(source, 50 * MB)
    assert server.proc is not None
    pid = server.proc.pid
    idle_kib = _status_kib(pid, "VmRSS")
    # Start the peak over (Linux: clear_refs 5): the server's start-up set a higher one, before
    # any transfer, that says nothing about it.
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    seen: list[tuple[int, int]] = []
    tracemalloc.start()
    try:
        ref = await alice.upload_attachment(
            source, 1, lambda done, total: seen.append((done, total))
        )
        out = await bob.download_attachment(ref, tmp_path / "received.bin")
        _, client_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    server_peak_kib = _status_kib(pid, "VmHWM")
    print(
        f"client peak {client_peak / 2**20:.1f} MiB; server idle {idle_kib} KiB, peak {server_peak_kib} KiB"
    )
    assert file_digest(out) == expected
    assert ref.size == 50 * MB and seen[-1] == (50 * MB, 50 * MB)
    # Far below 50 MB: a few MiB of pieces in flight on each side.
    assert client_peak < 8 * 1024 * 1024, client_peak
    assert server_peak_kib - idle_kib < 16 * 1024, (idle_kib, server_peak_kib)
    # Bob was the only recipient: the blob is gone from the server's data folder.
    assert blobs(server) == []
    await alice.close()
    await bob.close()


async def test_blob_damaged_on_the_servers_disk_is_refused(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    source = tmp_path / "doc.pdf"
    write_random_file(source, 3 * CHUNK + 100)
    ref = await alice.upload_attachment(source, 1)
    assert ref.mime == "application/pdf" and ref.name == "doc.pdf"
    stored = server.data / "blobs" / ref.id
    assert stored.stat().st_size == HEADER_BYTES + ciphertext_size(ref.size)
    with stored.open("r+b") as blob:  # one bit of the second chunk, as a thief with the disk
        blob.seek(HEADER_BYTES + CHUNK + 40)
        byte = blob.read(1)
        blob.seek(-1, os.SEEK_CUR)
        blob.write(bytes([byte[0] ^ 1]))
    target = tmp_path / "in"
    target.mkdir()
    with pytest.raises(AttachmentCorrupt):
        await bob.download_attachment(ref, target)
    assert list(target.iterdir()) == []  # neither the file nor its .part
    # Swap two chunks on disk: refused too.
    with stored.open("r+b") as blob:
        blob.seek(HEADER_BYTES)
        first = blob.read(CHUNK + 16)
        second = blob.read(CHUNK + 16)
        blob.seek(HEADER_BYTES)
        blob.write(second + first)
    with pytest.raises(AttachmentCorrupt):
        await bob.download_attachment(ref, target)
    assert list(target.iterdir()) == []
    assert blobs(server) == [ref.id]  # nobody confirmed: still there (until expiry)
    # audit-storage reports it while it is due, and as a finding once past its expiry.
    kinds = [(x.kind, x.detail) for x in audit(server.data, expect_empty=True).findings]
    assert ("blob", "attachment still stored (1 fetches due)") in kinds
    later = int(time.time()) + 31 * DAY
    kinds = [(x.kind, x.detail) for x in audit(server.data, now=later).findings]
    assert ("blob", "expired attachment still kept") in kinds
    await alice.close()
    await bob.close()


async def test_blob_is_kept_until_every_recipient_device_fetched_it_once(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    carol = await register(server, tmp_path / "carol")
    source = tmp_path / "photo.jpg"
    write_random_file(source, 300_000)
    ref = await alice.upload_attachment(source, 2)
    await bob.download_attachment(ref, tmp_path / "bob.jpg")
    # A hostile recipient confirming again and again counts once.
    for _ in range(5):
        await bob.transport.request(lambda rid: f.BlobFetched(rid=rid, id=ref.id), f.Done)
    assert blobs(server) == [ref.id]
    # Carol cannot confirm without having fetched it first.
    with pytest.raises(TicketInvalid):
        await carol.transport.request(lambda rid: f.BlobFetched(rid=rid, id=ref.id), f.Done)
    assert blobs(server) == [ref.id]
    out = await carol.download_attachment(ref, tmp_path)
    assert out == tmp_path / "photo (1).jpg"  # a folder target: its own name, never overwriting
    assert file_digest(out) == file_digest(source)
    assert blobs(server) == []  # every recipient fetched it: zeroed and unlinked
    assert [x for x in audit(server.data, expect_empty=True).findings if x.kind == "blob"] == []
    with pytest.raises(UnknownBlob):
        await carol.download_attachment(ref, tmp_path / "again.jpg")
    for client in (alice, bob, carol):
        await client.close()


async def test_oversized_upload_is_refused_before_any_byte_is_sent(
    limited: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = await register(limited, tmp_path / "alice")
    source = tmp_path / "big.bin"
    write_random_file(source, 3 * MB)
    puts: list[object] = []
    real_put = aiohttp.ClientSession.put

    def counting_put(self: aiohttp.ClientSession, *a: object, **k: object) -> object:
        puts.append(a)
        return real_put(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(aiohttp.ClientSession, "put", counting_put)
    with pytest.raises(BlobTooLarge) as refused:
        await alice.upload_attachment(source, 1)
    assert str(2 * MB) in refused.value.message
    assert puts == [] and blobs(limited) == []
    # A declared count over the limit is refused the same way.
    with pytest.raises(MalformedFrame):
        await alice.transport.request(
            lambda rid: f.BlobUpload(rid=rid, size=10, recipients=101), f.BlobTicket
        )
    await alice.close()


async def _ticket(client: KluisClient, size: int) -> f.BlobTicket:
    return await client.transport.request(
        lambda rid: f.BlobUpload(rid=rid, size=size, recipients=1), f.BlobTicket
    )


async def test_a_put_longer_than_its_ticket_is_cut(limited: ServerProcess, tmp_path: Path) -> None:
    alice = await register(limited, tmp_path / "alice")
    async with aiohttp.ClientSession() as http:
        # Content-Length over the ticket's size: refused before the body is read.
        t = await _ticket(alice, 1000)
        auth = {"Authorization": f"Bearer {t.ticket}"}
        async with http.put(f"{limited.url}/v1/blobs/{t.id}", data=b"x" * 5000, headers=auth) as r:
            assert r.status == 413 and (await r.json())["code"] == "blob_too_large"

        # Chunked, no length: cut at the first byte past the size.
        async def endless() -> object:
            for _ in range(10_000):
                yield b"y" * 1000

        t = await _ticket(alice, 1000)
        auth = {"Authorization": f"Bearer {t.ticket}"}
        try:
            async with http.put(
                f"{limited.url}/v1/blobs/{t.id}", data=endless(), headers=auth
            ) as r:
                assert r.status == 413
        except aiohttp.ClientError:
            pass  # or the connection is cut while we still send: either way, not stored
    assert blobs(limited) == []
    await alice.close()


async def test_tickets_cannot_be_misused(limited: ServerProcess, tmp_path: Path) -> None:
    alice = await register(limited, tmp_path / "alice")
    bob = await register(limited, tmp_path / "bob")
    source = tmp_path / "a.txt"
    source.write_bytes(b"attachment")
    ref = await alice.upload_attachment(source, 1)
    base = f"{limited.url}/v1/blobs"
    async with aiohttp.ClientSession() as http:

        async def status(method: str, path: str, ticket: str, body: bytes = b"") -> int:
            headers = {"Authorization": f"Bearer {ticket}"} if ticket else {}
            async with http.request(method, base + path, headers=headers, data=body) as r:
                return r.status

        assert await status("GET", f"/{ref.id}", "") == 401  # no ticket: a guessed ID is not enough
        assert await status("GET", f"/{ref.id}", "x" * 43) == 401
        down = await bob.transport.request(
            lambda rid: f.BlobDownload(rid=rid, id=ref.id), f.BlobTicket
        )
        assert await status("PUT", f"/{ref.id}", down.ticket, b"x") == 401  # wrong direction
        assert await status("GET", f"/{'0' * 32}", down.ticket) == 401  # another blob
        up = await _ticket(alice, 5)
        # Path traversal never reaches the disk: the ticket names the one ID it may touch.
        for path in ("/..%2F..%2Fkluis.sqlite3", "/../kluis.sqlite3", f"/{up.id}%2F.."):
            assert await status("PUT", path, up.ticket, b"hello") in (401, 404)
        # Those refusals left the ticket for its own transfer, which it serves once.
        assert await status("GET", f"/{ref.id}", down.ticket) == 200
        assert await status("GET", f"/{ref.id}", down.ticket) == 401  # single use
    with pytest.raises(UnknownBlob):
        await bob.transport.request(
            lambda rid: f.BlobDownload(rid=rid, id=os.urandom(16).hex()), f.BlobTicket
        )
    assert sorted(blobs(limited)) == [ref.id]
    await alice.close()
    await bob.close()


async def test_a_slow_upload_is_cut(limited: ServerProcess, tmp_path: Path) -> None:
    alice = await register(limited, tmp_path / "alice")
    t = await _ticket(alice, 1000)
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.port)
    writer.write(
        (
            f"PUT /v1/blobs/{t.id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t.ticket}\r\n"
            "Content-Length: 1000\r\n\r\n"
        ).encode()
        + b"z" * 10
    )
    await writer.drain()
    loop = asyncio.get_running_loop()
    start = loop.time()
    answer = await asyncio.wait_for(reader.read(), 10)  # the server answers and closes
    assert b" 408 " in answer.split(b"\r\n", 1)[0]
    assert loop.time() - start < 5
    writer.close()
    assert blobs(limited) == []
    await alice.close()


async def test_file_messages_one_to_one_and_in_a_group(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    carol = await register(server, tmp_path / "carol")
    source = tmp_path / "report.pdf"
    want = write_random_file(source, 300_000)

    sent = await alice.send_file(bob.account_id, source, "the report")
    assert sent.attachment is not None and sent.conversation == bob.account_id
    (got,) = await bob.receive(wait=5, until=1)
    assert got.attachment is not None
    assert (got.text, got.attachment.name, got.attachment.size) == (
        "the report",
        "report.pdf",
        300_000,
    )
    (saved,) = await bob.fetch_files(tmp_path / "bob-files")
    assert saved.name == "report.pdf" and file_digest(saved) == want
    assert await bob.fetch_files(tmp_path / "bob-files") == []  # each file once
    assert blobs(server) == []  # the one recipient device fetched it

    # In a group the reference travels in the group session; every member device fetches.
    group = (await alice.create_group("files", [bob.account_id, carol.account_id])).id
    for member in (bob, carol):
        await member.receive(wait=5, until=1)
    await alice.send_file(group, source)
    for member, name in ((bob, "bob"), (carol, "carol")):
        (message,) = await member.receive(wait=5, until=2)  # our session key, then the file
        assert message.conversation == group and message.attachment is not None
        assert len(blobs(server)) == 1
        (path,) = await member.fetch_files(tmp_path / f"{name}-group")
        assert file_digest(path) == want
    assert blobs(server) == []  # both member devices fetched it
    for client in (alice, bob, carol):
        await client.close()


async def test_a_preview_fetches_into_memory_and_leaves_the_blob_to_be_saved(
    server: ServerProcess, tmp_path: Path
) -> None:
    alice = await register(server, tmp_path / "alice")
    bob = await register(server, tmp_path / "bob")
    source = tmp_path / "photo.png"
    write_random_file(source, 100_000)
    ref = await alice.upload_attachment(source, 1)
    with pytest.raises(BlobTooLarge, match="over the limit of 99999"):
        await bob.attachment_bytes(ref, 99_999)  # refused before a ticket is asked
    data = await bob.attachment_bytes(ref, 100_000)
    assert hashlib.sha256(data).hexdigest() == file_digest(source)
    assert blobs(server) == [ref.id]  # a preview is not a fetch: still there to be saved
    assert list(tmp_path.glob("*.part")) == [] and not (tmp_path / "bob" / "photo.png").exists()
    out = await bob.download_attachment(ref, tmp_path / "saved.png")
    assert file_digest(out) == file_digest(source)
    assert blobs(server) == []
    for client in (alice, bob):
        await client.close()
