"""What the unlinkable envelope layout costs: store-level insert throughput by body size.

    .venv/bin/python -m bench.store_layout [--sends 4000] [--runs 3]

Each send deposits two envelopes for two different devices in one transaction (a recipient and
the sender's own second device), as the mailbox does for a send that no other send shares a
group commit with; 1,000 envelopes stay pending throughout, the rest are acknowledged in batches.
Bodies over SQLite's local-payload limit (about 960 bytes) are stored in scattered pieces
(``server/store/sqlite.py``), so their cost grows with their size. Figures go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from kluis.server.store.sqlite import SqliteDatabase

SIZES = (200, 2_048, 20_000)
DEVICES = 50


def sends_per_second(size: int, sends: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteDatabase(Path(tmp) / "bench.sqlite3")
        devices = [os.urandom(32).hex()[:43] for _ in range(DEVICES)]
        bodies = [os.urandom(size) for _ in range(64)]
        pending: list[tuple[str, int]] = []
        start = time.perf_counter()
        for i in range(sends):
            a, b = devices[i % DEVICES], devices[(i * 7 + 1) % DEVICES]
            ids = store.insert_envelopes(
                [(a, 10**10, bodies[i % 64]), (b, 10**10, bodies[(i + 1) % 64])]
            )
            pending += [(a, ids[0]), (b, ids[1])]
            if len(pending) >= 1_200:  # acknowledge the oldest, keep 1,000 waiting
                store.delete_envelopes(pending[:200])
                pending = pending[200:]
        elapsed = time.perf_counter() - start
        store.close()
        return sends / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sends", type=int, default=4_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for size in SIZES:
        best = max(sends_per_second(size, args.sends) for _ in range(args.runs))
        print(f"body {size:6,d} B: {best:8,.0f} sends/s (2 envelopes each, best of {args.runs})")


if __name__ == "__main__":
    main()
