"""Attachments on a deployment of two real ``kluis serve`` nodes (one scratch PostgreSQL
database, a Redis prefix, one ``--blob-dir`` for both, as an NFS mount would be).

Each client's WebSocket is pinned to one node; the loopback balancer at the public URL (where
the clients' HTTP transfers go) is pointed at the *other* node, so every ticket is asked on one
node and its transfer done on the other.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from kluis.errors import UnknownBlob
from kluis.protocol import frames as f
from tests.cluster import Cluster, cluster_of, join, redis_or_skip
from tests.loadbalancer import Balancer


@pytest.fixture
def two(tmp_path: Path) -> Iterator[Cluster]:
    redis_or_skip()
    with cluster_of(tmp_path, 2, licences=2) as cluster:
        yield cluster


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder(cluster: Cluster) -> list[str]:
    return sorted(p.name for p in cluster.blob_dir.iterdir()) if cluster.blob_dir.is_dir() else []


async def test_a_file_sent_through_one_node_is_fetched_through_the_other(
    two: Cluster, tmp_path: Path
) -> None:
    one, other = two.nodes
    alice = await join(two, tmp_path / "alice", via=one.url)  # her WebSocket: node one
    bob = await join(two, tmp_path / "bob", via=other.url)  # his: node two
    source = tmp_path / "photo.jpg"
    source.write_bytes(os.urandom(2 * 1024 * 1024 + 77))
    try:
        async with Balancer([("127.0.0.1", other.port)], port=two.public_port) as lb:
            # Alice's ticket on node one, her PUT on node two.
            sent = await alice.send_file(bob.account_id, source, "from node one")
            assert sent.attachment is not None
            blob_id = sent.attachment.id
            assert folder(two) == [blob_id]
            assert lb.routes[("127.0.0.1", other.port)] >= 1

            # A ticket is single-use across the nodes: asked on one, used on two, refused on one.
            t = await alice.transport.request(
                lambda rid: f.BlobDownload(rid=rid, id=blob_id), f.BlobTicket
            )
            headers = {"Authorization": f"Bearer {t.ticket}"}
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{other.url}/v1/blobs/{blob_id}", headers=headers) as r:
                    assert r.status == 200
                    assert len(await r.read()) == t.size
                async with http.get(f"{one.url}/v1/blobs/{blob_id}", headers=headers) as r:
                    assert r.status == 401
                    assert (await r.json())["code"] == "ticket_invalid"

            # Bob's ticket on node two, his GET on node one.
            lb.backends = [("127.0.0.1", one.port)]
            (got,) = await bob.receive(wait=5, until=1)
            assert got.attachment is not None and got.text == "from node one"
            (saved,) = await bob.fetch_files(tmp_path / "bob-files")
            assert digest(saved) == digest(source)
            assert lb.routes[("127.0.0.1", one.port)] >= 1

        # His confirmation (node two) was the last one expected: gone for both nodes.
        assert folder(two) == [f".del-{blob_id}"]  # unreachable; shredded by a later sweep
        for client in (alice, bob):  # alice asks node one, bob node two
            with pytest.raises(UnknownBlob):
                await client.transport.request(
                    lambda rid: f.BlobDownload(rid=rid, id=blob_id), f.BlobTicket
                )
    finally:
        await alice.close()
        await bob.close()
