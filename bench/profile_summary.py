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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stacks")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    total_n = 0
    self_n: collections.Counter[str] = collections.Counter()
    incl_n: collections.Counter[str] = collections.Counter()
    with open(args.stacks) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = [short(fr) for fr in stack.split(";")]
            total_n += n
            self_n[frames[-1]] += n
            for fr in set(frames):
                incl_n[fr] += n
    print(f"{total_n} samples\n\nself time:")
    for fr, n in self_n.most_common(args.top):
        print(f"{100 * n / total_n:5.1f}%  {fr}")
    print("\ninclusive time:")
    for fr, n in incl_n.most_common(args.top):
        print(f"{100 * n / total_n:5.1f}%  {fr}")


if __name__ == "__main__":
    main()
