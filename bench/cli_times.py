"""Time of each CLI command (process start, unlock, connect, act), p50 of N runs, on loopback.

Run: ``python -m bench.cli_times [N]``. Starts a server on a free loopback port with a fresh
data folder, registers two profiles with the default (full-strength) KDF, then runs each command
N times and prints the median and the 90th percentile. Bounded: N runs of six commands.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.kluis_testing import ServerProcess

KLUIS = [sys.executable, "-m", "kluis.apps.cli"]


def timed(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([*KLUIS, *args], env=env, check=True, capture_output=True, timeout=120)
    return time.perf_counter() - started


def main(runs: int = 20) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp) / "server")
        server.start()
        try:
            env = {**os.environ, "KLUIS_PASSPHRASE": "bench passphrase"}
            a, b = str(Path(tmp) / "a"), str(Path(tmp) / "b")
            codes = server.licences(2)
            ids = []
            for code, profile in zip(codes, (a, b), strict=True):
                out = subprocess.run(
                    [
                        *KLUIS,
                        "register",
                        "--server",
                        server.url,
                        "--licence",
                        code,
                        "--profile",
                        profile,
                    ],
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                ids.append(out.stdout.strip())
            commands = {
                "whoami (unlock only)": ["whoami", "--profile", a],
                "history (unlock, offline)": ["history", "--profile", a],
                "send": ["send", "--profile", a, ids[1], "bench"],
                "inbox": ["inbox", "--profile", b],
                "device list": ["device", "list", "--profile", a],
                "conversations": ["conversations", "--profile", a],
            }
            figures = {}
            for name, args in commands.items():
                times = sorted(timed(args, env) for _ in range(runs))
                figures[name] = {
                    "p50_s": round(statistics.median(times), 3),
                    "p90_s": round(times[int(0.9 * (len(times) - 1))], 3),
                }
                print(
                    f"{name:28s} p50 {figures[name]['p50_s']:.3f} s  p90 {figures[name]['p90_s']:.3f} s"
                )
            print(json.dumps({"runs": runs, "load_avg": os.getloadavg(), "commands": figures}))
        finally:
            server.stop()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
