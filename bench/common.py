"""Shared pieces of the load generator: the server under test, sampling, statistics.

Theory of operation: every workload starts its own ``kluis serve`` subprocess on a free loopback
port with a fresh data folder, hands out licences with ``kluis licence create`` before start-up,
samples the server's RSS and CPU with psutil while it runs, and stops it by PID. Nothing here ever
addresses anything outside 127.0.0.0/8, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

MB = 2**20
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def loopback_only(host: str) -> str:
    if not host.startswith("127."):
        raise SystemExit(f"refusing non-loopback target {host!r}")
    return host


def raise_nofile() -> int:
    """Raise the soft fd limit to the hard one (20,000 on these machines); return it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def pct(values: list[float], p: float) -> float:
    """Linear-interpolated percentile of sorted ``values`` (the peer script's definition)."""
    if not values:
        return float("nan")
    k = (len(values) - 1) * p / 100.0
    f = int(k)
    c = min(f + 1, len(values) - 1)
    return values[f] + (values[c] - values[f]) * (k - f)


def latency_fields(latencies_s: list[float]) -> dict[str, float]:
    lat = sorted(latencies_s)
    return {
        "e2e_ms_p50": pct(lat, 50) * 1e3,
        "e2e_ms_p90": pct(lat, 90) * 1e3,
        "e2e_ms_p99": pct(lat, 99) * 1e3,
        "e2e_ms_max": lat[-1] * 1e3 if lat else float("nan"),
        "e2e_ms_mean": sum(lat) / len(lat) * 1e3 if lat else float("nan"),
    }


async def send_time(start: float, k: int, interval: float) -> float:
    """The send time of message ``k``: now, or (paced) its schedule after sleeping until then.

    Paced latency counts from the scheduled time, so a stalled server cannot hide its own delay
    by holding senders back (no coordinated omission); the peer scripts do the same.
    """
    if not interval:
        return time.perf_counter()
    t0 = start + k * interval
    delay = t0 - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    while time.perf_counter() < t0:  # uvloop's timers have 1 ms steps and may fire early
        await asyncio.sleep(0)
    return t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sampler:
    """RSS of one process every ``interval`` seconds, in the background of an event loop."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def cpu(self) -> float:
        t = self.proc.cpu_times()
        return float(t.user + t.system)

    async def _run(self) -> None:
        while True:
            try:
                self.samples.append((time.perf_counter(), self.rss()))
            except psutil.Error:
                return
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def peak(self) -> int:
        return max((r for _, r in self.samples), default=0)


class Server:
    """A ``kluis serve`` subprocess with its own data folder, on loopback."""

    def __init__(self, *extra_args: str, licences: int = 0, workdir: Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kluis-bench-", dir=workdir))
        self.data = self.dir / "data"
        self.port = free_port()
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.licences: list[str] = []
        self.log_path = self.dir / "server.log"
        if licences:
            self.licences = self.make_licences(licences)

    @property
    def kluis(self) -> list[str]:
        exe = Path(sys.executable).with_name("kluis")
        return [str(exe)] if exe.exists() else [sys.executable, "-m", "kluis.apps.cli"]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def make_licences(self, count: int) -> list[str]:
        out = subprocess.run(
            [
                *self.kluis,
                "licence",
                "create",
                "--init",
                "--data",
                str(self.data),
                "--count",
                str(count),
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return out.stdout.split()

    def start(self) -> int:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.kluis,
                    "serve",
                    "--data",
                    str(self.data),
                    "--port",
                    str(self.port),
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=raise_nofile,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()}")
            with contextlib.suppress(OSError):
                if self.health() is not None:
                    return self.proc.pid
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not come up in 20 s")

    def health(self) -> dict[str, Any] | None:
        url = f"http://127.0.0.1:{self.port}/health"
        with urllib.request.urlopen(url, timeout=5) as r:
            data: dict[str, Any] = json.loads(r.read())
            return data

    def connections_held(self) -> int:
        """Open client sockets of the server process (``/health`` no longer counts devices)."""
        if self.proc is None:
            return 0
        return sum(
            1
            for c in psutil.Process(self.proc.pid).net_connections("tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == self.port
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if not os.environ.get("KLUIS_BENCH_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)


def write_result(name: str, result: dict[str, Any], out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    return path


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "mem_total_mb": psutil.virtual_memory().total // MB,
        "nofile_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    return info
