"""Summarise py-spy raw (collapsed) stacks: share of samples per function, self and total.

python -m bench.profile_summary STACKS.txt [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import re

_FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:]+)(?::\d+)?\)$")


def short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for marker in ("site-packages/", "src/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m['func']} ({path})"


def bucket(frames: list[str]) -> str:
    """Where one sample's time goes, coarsely: the system call, the library, or our code."""
    leaf = frames[-1]
    if leaf.startswith(("write ", "writev ", "send")):
        return "write(2) on sockets"
    if leaf.startswith(("read ", "recv")):
        return "read(2) on sockets"
    if leaf.startswith("epoll"):
        return "epoll_wait"
    joined = ";".join(frames)
    if "sqlite" in joined.lower():
        return "SQLite (statements, commit, WAL pwrite/fsync, checkpoint)"
    if "msgspec" in joined or "frames.py" in joined:
        return "msgspec encode/decode"
    for fr in reversed(frames):  # the innermost Python owner of the sample
        if "kluis/" in fr:
            return "Kluis Python (connection, mailbox, outbox)"
        if "aiohttp/" in fr or "reader_c" in fr:
            return "aiohttp WebSocket and HTTP layer"
        if "asyncio/" in fr or "loop.c" in fr or "_asynciomodule" in fr:
            return "event loop (uvloop, asyncio futures and tasks)"
    return "other (interpreter, refcounting, ...)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stacks")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    total_n = 0
    self_n: collections.Counter[str] = collections.Counter()
    incl_n: collections.Counter[str] = collections.Counter()
    buckets: collections.Counter[str] = collections.Counter()
    with open(args.stacks) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = [short(fr) for fr in stack.split(";")]
            total_n += n
            buckets[bucket(frames)] += n
            self_n[frames[-1]] += n
            for fr in set(frames):
                incl_n[fr] += n
    print(f"{total_n} samples\n\nby area:")
    for name, n in buckets.most_common():
        print(f"{100 * n / total_n:5.1f}%  {name}")
    print("\nself time:")
    for fr, n in self_n.most_common(args.top):
        print(f"{100 * n / total_n:5.1f}%  {fr}")
    print("\ninclusive time:")
    for fr, n in incl_n.most_common(args.top):
        print(f"{100 * n / total_n:5.1f}%  {fr}")


if __name__ == "__main__":
    main()
