"""server/blob_shared.py and blob_ledger.py: two nodes in one process over one blob folder and
one Redis prefix (the shared Redis; the prefix is dropped after each test). The ticket goes to
one node and the transfer to the other; quotas, confirmations, expiry and a Redis that lost
everything are seen from both."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kluis.errors import QuotaExceeded, RateLimited, ServerError, TicketInvalid, UnknownBlob
from kluis.protocol import frames as f
from kluis.server.blob_ledger import BlobLedger
from kluis.server.blob_shared import SharedBlobService
from kluis.server.config import DAY, Limits
from tests.kluis_testing import free_port
from tests.redis_testing import drop_prefix
from tests.test_delivery_redis import REDIS_URL, _redis_reachable


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Pair:
    """Nodes ``a`` and ``b`` of one deployment."""

    def __init__(self, root: Path, prefix: str, **limits: Any) -> None:
        self.clock = Clock()
        self.prefix = prefix
        self.root = root / "shared-blobs"
        self.a, self.b = (
            SharedBlobService.shared(
                self.root,
                Limits(**limits),
                self.clock,
                BlobLedger(REDIS_URL, prefix),
                lambda: b"k" * 32,
                sweep_period_s=0.01,
            )
            for _ in range(2)
        )

    def files(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []


@pytest.fixture
async def pair(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    reason = await _redis_reachable()
    if reason is not None:
        pytest.skip(reason)
    prefix = f"kluis-test-{secrets.token_hex(6)}"
    limits = getattr(request, "param", {})
    nodes = Pair(tmp_path, prefix, **limits)
    try:
        yield nodes
    finally:
        await nodes.a.ledger.close()
        await nodes.b.ledger.close()
        drop_prefix(REDIS_URL, prefix)


def redis_dump(prefix: str) -> str:
    """Every key and value under the prefix, as one text."""
    import redis

    out: list[str] = []
    with redis.Redis.from_url(REDIS_URL, decode_responses=True) as client:
        for key in client.scan_iter(match=f"{prefix}:*"):
            kind = client.type(key)
            value: object = {
                "string": client.get,
                "hash": client.hgetall,
                "set": client.smembers,
                "zset": lambda k: client.zrange(k, 0, -1),
            }[kind](key)
            out.append(f"{key} {value}")
    return "\n".join(out)


async def ticket(node: SharedBlobService, device: str, frame: Any) -> f.BlobTicket:
    answer = await node.answer(device, frame)
    assert isinstance(answer, f.BlobTicket)
    return answer


async def put(
    asked: SharedBlobService, sent: SharedBlobService, device: str, data: bytes, recipients: int
) -> str:
    t = await ticket(asked, device, f.BlobUpload(rid=1, size=len(data), recipients=recipients))
    upload = await sent.start_upload(await sent.claim(t.ticket, t.id, upload=True))
    await upload.write(data)
    await upload.commit()
    return t.id


async def fetch(
    asked: SharedBlobService, sent: SharedBlobService, device: str, blob_id: str
) -> bytes:
    t = await ticket(asked, device, f.BlobDownload(rid=2, id=blob_id))
    download = await sent.start_download(await sent.claim(t.ticket, blob_id, upload=False))
    out = b""
    while data := await download.read():
        out += data
    await sent.completed(download)
    await download.close()
    return out


async def test_ticket_on_one_node_transfer_on_the_other(pair: Pair) -> None:
    data = secrets.token_bytes(3 * 1024 * 1024 + 5)
    blob_id = await put(pair.a, pair.b, "alice", data, recipients=2)
    assert pair.files() == [blob_id]  # renamed whole: no .part left
    assert await fetch(pair.b, pair.a, "bob", blob_id) == data
    assert await fetch(pair.a, pair.b, "carol", blob_id) == data
    with pytest.raises(TicketInvalid):  # confirming needs a completed fetch, on any node
        await pair.b.answer("mallory", f.BlobFetched(rid=3, id=blob_id))
    await pair.a.answer("bob", f.BlobFetched(rid=3, id=blob_id))
    await ticket(pair.a, "carol", f.BlobDownload(rid=9, id=blob_id))  # one unused ticket too
    dump = redis_dump(pair.prefix)
    assert blob_id in dump and pair.a._tag("bob") in dump
    assert not any(name in dump for name in ("alice", "bob", "carol"))  # tags, never IDs
    await pair.b.answer("bob", f.BlobFetched(rid=4, id=blob_id))  # counts once
    assert pair.files() == [blob_id]
    await pair.b.answer("carol", f.BlobFetched(rid=5, id=blob_id))  # the last one
    assert pair.files() == [f".del-{blob_id}"]  # unreachable at once, shredded by a sweep
    for node in (pair.a, pair.b):
        with pytest.raises(UnknownBlob):
            await node.answer("carol", f.BlobDownload(rid=6, id=blob_id))


async def test_a_ticket_is_used_once_across_nodes(pair: Pair) -> None:
    blob_id = await put(pair.a, pair.a, "alice", b"x" * 100, recipients=1)
    t = await ticket(pair.a, "bob", f.BlobDownload(rid=1, id=blob_id))
    with pytest.raises(TicketInvalid):  # bound to one direction
        await pair.b.claim(t.ticket, blob_id, upload=True)
    with pytest.raises(TicketInvalid):  # and one blob
        await pair.b.claim(t.ticket, "0" * 32, upload=False)
    taken = await pair.b.claim(t.ticket, blob_id, upload=False)
    assert (taken.device, taken.size) == (pair.a._tag("bob"), 100)  # Redis holds no device ID
    assert "bob" not in taken.device
    for node in (pair.a, pair.b):
        with pytest.raises(TicketInvalid):
            await node.claim(t.ticket, blob_id, upload=False)


@pytest.mark.parametrize(
    "pair",
    [{"blob_quota_bytes": 100, "blob_store_bytes": 150, "max_blob_tickets": 2}],
    indirect=True,
)
async def test_quotas_hold_across_nodes(pair: Pair) -> None:
    first = await put(pair.a, pair.a, "alice", b"a" * 60, recipients=1)
    with pytest.raises(QuotaExceeded):  # the device's quota, asked on the other node
        await pair.b.answer("alice", f.BlobUpload(rid=1, size=41, recipients=1))
    t = await ticket(pair.b, "bob", f.BlobUpload(rid=2, size=80, recipients=1))
    with pytest.raises(QuotaExceeded):  # the deployment's room: 60 kept + 80 reserved
        await pair.a.answer("carol", f.BlobUpload(rid=3, size=11, recipients=1))
    await ticket(pair.a, "dave", f.BlobDownload(rid=4, id=first))
    await ticket(pair.b, "dave", f.BlobDownload(rid=5, id=first))
    with pytest.raises(RateLimited):  # unused tickets per device, counted on both nodes
        await pair.a.answer("dave", f.BlobDownload(rid=6, id=first))
    # An upload that fails gives its room back, whichever node reserved it.
    upload = await pair.a.start_upload(await pair.a.claim(t.ticket, t.id, upload=True))
    await upload.abort()
    await ticket(pair.b, "carol", f.BlobUpload(rid=7, size=90, recipients=1))


@pytest.mark.parametrize("pair", [{"blob_quota_bytes": 100, "blob_ticket_ttl_s": 1}], indirect=True)
async def test_an_unused_upload_ticket_gives_its_room_back(pair: Pair) -> None:
    t = await ticket(pair.a, "alice", f.BlobUpload(rid=1, size=100, recipients=1))
    with pytest.raises(QuotaExceeded):
        await pair.b.answer("alice", f.BlobUpload(rid=2, size=1, recipients=1))
    time.sleep(1.1)
    with pytest.raises(TicketInvalid):  # expired
        await pair.b.claim(t.ticket, t.id, upload=True)
    with pytest.raises(QuotaExceeded):  # its room is held until a sweep releases it
        await pair.b.answer("alice", f.BlobUpload(rid=3, size=1, recipients=1))
    await pair.b.sweep()
    await ticket(pair.a, "alice", f.BlobUpload(rid=4, size=100, recipients=1))


async def test_expiry_sweep_and_shredding_by_any_node(pair: Pair) -> None:
    blob_id = await put(pair.a, pair.b, "alice", b"e" * 500, recipients=3)
    stale = pair.root / f".part-{'1' * 32}"  # the upload of a node that died long ago
    stale.write_bytes(b"half")
    old = time.time() - 7 * DAY
    os.utime(stale, (old, old))
    fresh = pair.root / f".part-{'2' * 32}"  # another node's upload in progress: kept
    fresh.write_bytes(b"half")
    assert await pair.b.sweep() == 0
    assert pair.files() == [f".part-{'2' * 32}", blob_id]
    pair.clock.now += 31 * DAY
    time.sleep(0.02)  # the sweep lock's period
    assert await pair.a.sweep() == 1
    with pytest.raises(UnknownBlob):
        await pair.b.answer("bob", f.BlobDownload(rid=1, id=blob_id))
    doomed = pair.root / f".del-{blob_id}"
    os.utime(doomed, (old, old))  # as if the longest transfer had passed since
    time.sleep(0.02)
    await pair.b.sweep()
    assert pair.files() == [f".part-{'2' * 32}"]


@pytest.mark.parametrize("pair", [{"blob_quota_bytes": 100}], indirect=True)
async def test_a_redis_that_lost_everything(pair: Pair) -> None:
    blob_id = await put(pair.a, pair.b, "alice", b"r" * 90, recipients=2)
    await fetch(pair.a, pair.b, "bob", blob_id)
    drop_prefix(REDIS_URL, pair.prefix)  # Redis restarted empty
    # The record comes back from the file's header; the uploader's quota does not count it.
    assert await fetch(pair.b, pair.a, "carol", blob_id) == b"r" * 90
    await ticket(pair.a, "alice", f.BlobUpload(rid=1, size=100, recipients=1))
    with pytest.raises(TicketInvalid):  # bob's completed fetch was forgotten: he fetches again
        await pair.a.answer("bob", f.BlobFetched(rid=2, id=blob_id))
    await pair.b.answer("carol", f.BlobFetched(rid=3, id=blob_id))
    await fetch(pair.a, pair.a, "bob", blob_id)
    await pair.a.answer("bob", f.BlobFetched(rid=4, id=blob_id))
    assert pair.files() == [f".del-{blob_id}"]


async def test_without_redis_attachments_are_refused_with_a_typed_error(tmp_path: Path) -> None:
    ledger = BlobLedger(f"redis://127.0.0.1:{free_port()}/0", "down", op_timeout_s=0.5)
    node = SharedBlobService.shared(
        tmp_path / "blobs", Limits(), time.time, ledger, lambda: b"k" * 32
    )
    try:
        for frame in (
            f.BlobUpload(rid=1, size=10, recipients=1),
            f.BlobDownload(rid=2, id="0" * 32),
            f.BlobFetched(rid=3, id="0" * 32),
        ):
            with pytest.raises(ServerError) as info:
                await node.answer("alice", frame)
            assert info.value.code == "internal"
        with pytest.raises(ServerError):
            await node.claim("ticket", "0" * 32, upload=True)
    finally:
        await ledger.close()


async def test_an_upload_whose_record_cannot_be_written_leaves_no_blob(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = await ticket(pair.a, "alice", f.BlobUpload(rid=1, size=10, recipients=1))
    upload = await pair.b.start_upload(await pair.b.claim(t.ticket, t.id, upload=True))
    await upload.write(b"0123456789")

    async def down(*args: object) -> None:
        raise ServerError("Redis does not answer")

    monkeypatch.setattr(pair.b.ledger, "commit", down)
    monkeypatch.setattr(pair.b.ledger, "release", down)
    with pytest.raises(ServerError):
        await upload.commit()
    await upload.abort()  # quiet: the reservation lapses instead
    assert pair.files() == [f".del-{t.id}"]
    with pytest.raises(UnknownBlob):
        await pair.a.answer("bob", f.BlobDownload(rid=2, id=t.id))
