"""Time of each CLI command (process start, unlock, connect, act), p50 of N runs, on loopback.

Run: ``python -m bench.cli_times [N]``. Starts a server on a free loopback port with a fresh
data folder, registers two profiles with the default (full-strength) KDF, then runs each command
N times (after one untimed run) and prints the median and the 90th percentile, alone and with
a daemon on each profile. Bounded: N + 1 runs of six commands, twice.

The commands run as an installed ``kluis`` does: with bytecode (``PYTHONDONTWRITEBYTECODE`` is
dropped from their environment; with it, every run compiles Kluis's own modules again, about
0.13 s here, which no installed copy pays).
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
from typing import Any

from tests.kluis_testing import ServerProcess

# As the `kluis` console script runs it: its entry point answers through a daemon when one runs.
KLUIS = [sys.executable, "-m", "kluis.apps.quick"]


def timed(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([*KLUIS, *args], env=env, check=True, capture_output=True, timeout=120)
    return time.perf_counter() - started


def measure(commands: dict[str, list[str]], env: dict[str, str], runs: int) -> dict[str, Any]:
    figures = {}
    for name, args in commands.items():
        timed(args, env)  # bytecode written, files cached
        times = sorted(timed(args, env) for _ in range(runs))
        figures[name] = {
            "p50_s": round(statistics.median(times), 3),
            "p90_s": round(times[int(0.9 * (len(times) - 1))], 3),
        }
        print(f"{name:28s} p50 {figures[name]['p50_s']:.3f} s  p90 {figures[name]['p90_s']:.3f} s")
    return figures


def with_daemons(profiles: list[str], env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    """``kluis daemon`` on each profile, once each listens on its socket."""
    daemons = [
        subprocess.Popen(
            [*KLUIS, "daemon", "--profile", p, "--lock-after", "600"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for p in profiles
    ]
    deadline = time.monotonic() + 30
    while not all((Path(p) / "daemon.sock").exists() for p in profiles):
        if time.monotonic() > deadline:
            raise SystemExit("the daemons did not start in 30 s")
        time.sleep(0.05)
    time.sleep(1.0)  # and connected
    return daemons


def main(runs: int = 20) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp) / "server")
        server.start()
        try:
            env = {**os.environ, "KLUIS_PASSPHRASE": "bench passphrase"}
            env.pop("PYTHONDONTWRITEBYTECODE", None)
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
            figures = measure(commands, env, runs)
            print("with a daemon on each profile (no passphrase given):")
            daemons = with_daemons([a, b], env)
            try:
                bare = {k: v for k, v in env.items() if k != "KLUIS_PASSPHRASE"}
                daemon = measure(commands, bare, runs)
            finally:
                for d in daemons:
                    d.terminate()
                    d.wait(10)
            report = {"runs": runs, "load_avg": os.getloadavg(), "commands": figures}
            print(json.dumps(report | {"with_daemon": daemon}))
        finally:
            server.stop()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
