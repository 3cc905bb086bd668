"""Attachment throughput: upload and download MB/s of one large file on loopback, and both
processes' peak RSS.

    .venv/bin/python -m bench.attachments [--mb 200] [--out bench/results]

Theory of operation: the parent starts a ``kluis serve`` subprocess, registers two accounts
(Alice and Bob) and writes a file of random bytes. A child process (``--child``) opens Alice's
profile, uploads the file as an attachment for one recipient, then opens Bob's and downloads it;
it reports the time of each transfer (from the ticket request to the verified file renamed into
place, including encryption, decryption and fsync), its RSS once connected (idle) and its peak
(``ru_maxrss``). The parent samples the server's RSS throughout and reads its peak (``VmHWM``),
checks the downloaded file's SHA-256 against the source, and that the blob left the server's
data folder. MB is 10^6 bytes; RSS in MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from bench.common import RESULTS, Sampler, Server, machine, write_result
from bench.crypto_mode import PASSPHRASE, make_client
from kluis.client.client import KluisClient
from kluis.protocol.attachment import AttachmentRef

MB = 1000 * 1000
MIB = 2**20


def _status_kib(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as src:
        while piece := src.read(MIB):
            h.update(piece)
    return h.hexdigest()


# ---- the child: the client side, in its own process so that its peak RSS is its own -----------


async def child(args: argparse.Namespace) -> dict[str, Any]:
    alice = KluisClient.open(Path(args.alice), PASSPHRASE)
    bob = KluisClient.open(Path(args.bob), PASSPHRASE)
    await alice.connect()
    await bob.connect()
    idle_kib = _status_kib("self", "VmRSS")
    start = time.perf_counter()
    ref = await alice.upload_attachment(Path(args.source), 1)
    upload_s = time.perf_counter() - start
    Path(args.ref).write_bytes(msgspec.msgpack.encode(ref))
    start = time.perf_counter()
    await bob.download_attachment(ref, Path(args.target))
    download_s = time.perf_counter() - start
    await alice.close()
    await bob.close()
    return {
        "upload_s": upload_s,
        "download_s": download_s,
        "client_idle_rss_mib": idle_kib / 1024,
        "client_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ---- the parent -------------------------------------------------------------------------------


async def run(mb: int) -> dict[str, Any]:
    server = Server(licences=2)
    try:
        pid = server.start()
        profiles = [server.dir / "alice", server.dir / "bob"]
        for licence, profile in zip(server.licences, profiles, strict=True):
            await (await make_client(server, licence, profile)).close()
        source, target = server.dir / "source.bin", server.dir / "received.bin"
        with source.open("wb") as out:
            for _ in range(mb):
                out.write(os.urandom(MB))
        expected = _digest(source)
        sampler = Sampler(pid, interval=0.05)
        server_idle_mib = sampler.rss() / MIB
        sampler.start()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.attachments",
            "--child",
            "--alice",
            str(profiles[0]),
            "--bob",
            str(profiles[1]),
            "--source",
            str(source),
            "--target",
            str(target),
            "--ref",
            str(server.dir / "ref.msgpack"),
            stdout=subprocess.PIPE,
        )
        async with asyncio.timeout(600):
            printed, _ = await proc.communicate()
        await sampler.stop()
        if proc.returncode != 0:
            raise RuntimeError(f"client process failed ({proc.returncode})")
        figures: dict[str, Any] = json.loads(printed.decode().strip().splitlines()[-1])
        ref = msgspec.msgpack.decode((server.dir / "ref.msgpack").read_bytes(), type=AttachmentRef)
        assert _digest(target) == expected, "the downloaded file differs from the source"
        blobs_left = sorted(p.name for p in (server.data / "blobs").iterdir())
        assert ref.id not in blobs_left, "the blob is still on the server after its fetch"
        server_peak_mib = _status_kib(pid, "VmHWM") / 1024
        return {
            "workload": "attachments",
            "file_mb": mb,
            "upload_mb_s": mb / figures["upload_s"],
            "download_mb_s": mb / figures["download_s"],
            **figures,
            "server_idle_rss_mib": server_idle_mib,
            "server_peak_rss_mib": server_peak_mib,
            "server_sampled_peak_rss_mib": sampler.peak() / MIB,
            "digest_ok": True,
            "blob_deleted": True,
            "machine": machine(),
        }
    finally:
        server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200, help="file size in MB (10^6 bytes)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("alice", "bob", "source", "target", "ref"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args))), flush=True)
        return
    result = asyncio.run(run(args.mb))
    path = write_result("attachments", result, args.out)
    for key in (
        "upload_mb_s",
        "download_mb_s",
        "client_idle_rss_mib",
        "client_peak_rss_mib",
        "server_idle_rss_mib",
        "server_peak_rss_mib",
    ):
        print(f"{key:24} {result[key]:10.1f}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
