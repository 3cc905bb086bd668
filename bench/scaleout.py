"""Scale-out figures (issue 12): N nodes on PostgreSQL + Redis beside one node on SQLite.

Theory of operation: each step starts its own ``kluis serve`` processes on free loopback ports,
all on one scratch PostgreSQL database (created here, dropped afterwards) and one Redis key prefix,
and hands out licences with ``kluis licence create --database``. Then:

- **pairs**: ``users`` devices in pairs, each sender registered on node ``i`` and its receiver on
  node ``i + 1`` (every message crosses nodes when there are two or more), ``messages`` per sender
  back to back; throughput, end-to-end p50/p99, and the CPU each hop spends per message: the nodes,
  the PostgreSQL server processes and the Redis server, sampled from /proc over the send window;
- **idle**: ``idle`` authenticated devices spread over the nodes by child processes
  (``bench.idle_child``), then the resident memory of the whole deployment: the nodes' RSS, the
  Redis server's RSS and the PostgreSQL processes' PSS (proportional: their shared buffers counted
  once, not once per backend).

The machine is shared, so the other processes' CPU during each window is recorded beside the
figures. Nothing here addresses anything outside 127.0.0.0/8; every wait is bounded.

    .venv/bin/python -m bench.scaleout --nodes 1,2,3 --users 100 --messages 200
    .venv/bin/python -m bench.scaleout --only idle --idle 50000 --nodes 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import redis.asyncio as aioredis

from bench.common import MB, RESULTS, ROOT, Sampler, Server, machine, write_result
from bench.workloads import _read_line, register_all, run_pairs

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"


class Group:
    """CPU seconds of several processes at once (a node set, the PostgreSQL server, Redis)."""

    def __init__(self, procs: list[psutil.Process]) -> None:
        self.procs = procs

    @classmethod
    def named(cls, name: str) -> Group:
        return cls([p for p in psutil.process_iter(["name"]) if p.info["name"] == name])

    def cpu(self) -> float:
        total = 0.0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def refresh(self, name: str) -> None:
        """PostgreSQL starts a backend per connection: pick up the ones born since."""
        known = {p.pid for p in self.procs}
        for p in psutil.process_iter(["name"]):
            if p.info["name"] == name and p.pid not in known:
                self.procs.append(p)


class Cluster:
    """``nodes`` ``kluis serve`` processes on one scratch database (or one node on SQLite)."""

    def __init__(self, nodes: int, *, sqlite: bool = False) -> None:
        self.count = nodes
        self.sqlite = sqlite
        self.db = f"kluis_bench_{secrets.token_hex(6)}"
        self.url = ADMIN_URL.rpartition("/")[0] + "/" + self.db
        self.prefix = f"kluis-scaleout-{secrets.token_hex(4)}"
        self.nodes: list[Server] = []
        # Nodes of one deployment share the storage key file (made at the database's first use).
        self.key_dir = Path(tempfile.mkdtemp(prefix="kluis-bench-keys-"))
        self.key_file = self.key_dir / "storage.key"

    async def __aenter__(self) -> Cluster:
        if not self.sqlite:
            await _admin(f'CREATE DATABASE "{self.db}"')
            for _ in range(self.count):
                self.nodes.append(
                    Server(
                        "--database",
                        self.url,
                        "--redis",
                        REDIS_URL,
                        "--redis-prefix",
                        self.prefix,
                        "--storage-key-file",
                        str(self.key_file),
                    )
                )
        else:
            self.nodes.append(Server())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for node in self.nodes:
            node.cleanup()
        if not self.sqlite:
            await _admin(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
        shutil.rmtree(self.key_dir, ignore_errors=True)
        if not self.sqlite:  # the nodes' shared counters and presence keys (some outlive them)
            client = aioredis.Redis.from_url(REDIS_URL)
            try:
                keys = [k async for k in client.scan_iter(match=f"{self.prefix}:*")]
                if keys:
                    await client.delete(*keys)
            finally:
                await client.aclose()

    def licences(self, count: int) -> list[str]:
        if self.sqlite:
            return self.nodes[0].make_licences(count)
        out = subprocess.run(
            [
                *self.nodes[0].kluis,
                "licence",
                "create",
                "--database",
                self.url,
                "--storage-key-file",
                str(self.key_file),
                "--count",
                f"{count}",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        return out.stdout.split()

    def start(self) -> list[int]:
        return [node.start() for node in self.nodes]

    def node_cpu(self) -> Group:
        return Group([psutil.Process(n.proc.pid) for n in self.nodes if n.proc is not None])


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _machine_busy() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.system + getattr(t, "nice", 0.0))


async def pairs_step(nodes: int, users: int, messages: int, *, sqlite: bool) -> dict[str, Any]:
    label = "1 node, SQLite" if sqlite else f"{nodes} node(s), PostgreSQL + Redis"
    res: dict[str, Any] = {"label": label, "nodes": nodes, "users": users}
    async with Cluster(nodes, sqlite=sqlite) as cluster:
        codes = cluster.licences(users)
        pids = cluster.start()
        # Sender i on node i, its receiver on node i + 1: with two nodes or more, every message
        # crosses nodes (committed by one, announced over Redis, pushed by the other).
        devices = []
        for i in range(0, users - 1, 2):
            devices += [(i // 2) % nodes, (i // 2 + 1) % nodes]
        by_node: dict[int, list[int]] = {}
        for slot, node in enumerate(devices):
            by_node.setdefault(node, []).append(slot)
        registered: list[Any] = [None] * len(devices)
        for node, slots in by_node.items():
            got = await register_all(cluster.nodes[node], [codes[s] for s in slots])
            for s, d in zip(slots, got, strict=True):
                registered[s] = d
        await asyncio.gather(*(d.synced for d in registered))
        node_cpu = cluster.node_cpu()
        pg, redis = Group.named("postgres"), Group.named("redis-server")
        pg0, redis0, nodes0, busy0 = pg.cpu(), redis.cpu(), node_cpu.cpu(), _machine_busy()
        sampler = Sampler(pids[0])  # run_pairs reads one process's CPU: the first node's
        out = await run_pairs(cluster.nodes[0], sampler, registered, messages)
        pg.refresh("postgres")
        pg1, redis1, nodes1, busy1 = pg.cpu(), redis.cpu(), node_cpu.cpu(), _machine_busy()
        sent = max(1, int(out["messages_sent"]))
        wall = float(out["send_wall_s"]) or 1.0
        res.update(
            {
                "send_throughput_msg_s": out["send_throughput_msg_s"],
                "e2e_ms_p50": out["e2e_ms_p50"],
                "e2e_ms_p99": out["e2e_ms_p99"],
                "messages_sent": out["messages_sent"],
                "messages_lost": out["messages_lost"],
                "errors": out["errors"],
                "nodes_cpu_us_per_msg": 1e6 * (nodes1 - nodes0) / sent,
                "postgres_cpu_us_per_msg": 0.0 if sqlite else 1e6 * (pg1 - pg0) / sent,
                "redis_cpu_us_per_msg": 0.0 if sqlite else 1e6 * (redis1 - redis0) / sent,
                "client_cpu_pct": out["client_cpu_pct_during_send"],
                "machine_busy_pct": 100 * (busy1 - busy0) / wall,
            }
        )
        await asyncio.gather(*(d.close() for d in registered), return_exceptions=True)
    return res


def _rss(procs: list[psutil.Process], pss: bool = False) -> int:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += int(p.memory_full_info().pss if pss else p.memory_info().rss)
    return total


async def idle_step(nodes: int, idle: int, per_child: int = 9_000) -> dict[str, Any]:
    res: dict[str, Any] = {"nodes": nodes, "idle_target": idle}
    children: list[subprocess.Popen[str]] = []
    async with Cluster(nodes) as cluster:
        t = time.perf_counter()
        codes = cluster.licences(idle)
        res["licences_s"] = time.perf_counter() - t
        cluster.start()
        node_procs = [psutil.Process(n.proc.pid) for n in cluster.nodes if n.proc is not None]
        res["nodes_rss_start_mb"] = _rss(node_procs) / MB
        try:
            per_node = (idle + nodes - 1) // nodes
            t = time.perf_counter()
            for k, node in enumerate(cluster.nodes):
                share = codes[k * per_node : (k + 1) * per_node]
                for c in range(0, len(share), per_child):
                    path = node.dir / f"licences-{c}.txt"
                    path.write_text("\n".join(share[c : c + per_child]))
                    j = len(children)
                    ips = ",".join(f"127.0.{1 + j}.{2 + i}" for i in range(4))
                    children.append(
                        subprocess.Popen(
                            [
                                *(sys.executable, "-m", "bench.idle_child", "--url", node.url),
                                *("--licences", str(path), "--source-ips", ips, "--hold", "3600"),
                                *("--concurrency", "100"),
                            ],
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE,
                            text=True,
                            cwd=ROOT,
                        )
                    )
            reports = await asyncio.gather(*(_read_line(p, "CONNECTED ", 3000) for p in children))
            res["connect_s"] = time.perf_counter() - t
            res["connected"] = sum(int(r.get("ok", 0)) for r in reports)
            res["failed"] = sum(max(0, int(r.get("fail", 0))) for r in reports)
            res["child_errors"] = [r.get("errors", {}) for r in reports if r.get("errors")]
            await asyncio.sleep(3.0)  # let the nodes settle before reading memory
            held = sum(n.connections_held() for n in cluster.nodes)
            res["connections_held"] = held
            pg = Group.named("postgres").procs
            redis = Group.named("redis-server").procs
            res["nodes_rss_mb"] = _rss(node_procs) / MB
            res["redis_rss_mb"] = _rss(redis) / MB
            res["postgres_pss_mb"] = _rss(pg, pss=True) / MB
            res["total_mb"] = res["nodes_rss_mb"] + res["redis_rss_mb"] + res["postgres_pss_mb"]
            res["kb_per_device"] = 1024 * res["total_mb"] / max(1, held)
        finally:
            for proc in children:
                if proc.stdin is not None:
                    with contextlib.suppress(OSError):
                        proc.stdin.close()
            for proc in children:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return res


async def main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    result: dict[str, Any] = {"machine": machine(), "started": time.strftime("%H:%M:%S")}
    if "pairs" in args.only:
        steps = [await pairs_step(1, args.users, args.messages, sqlite=True)]
        print(json.dumps(steps[-1]), flush=True)
        for n in [int(x) for x in args.nodes.split(",")]:
            steps.append(await pairs_step(n, args.users, args.messages, sqlite=False))
            print(json.dumps(steps[-1]), flush=True)
        result["pairs"] = steps
    if "idle" in args.only and args.idle:
        n = max(int(x) for x in args.nodes.split(","))
        result["idle"] = await idle_step(n, args.idle)
        print(json.dumps(result["idle"]), flush=True)
    result["ended"] = time.strftime("%H:%M:%S")
    print(write_result(args.name, result, out))


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="1,2,3", help="node counts for PostgreSQL + Redis")
    ap.add_argument("--users", type=int, default=100, help="pairs: devices (half send)")
    ap.add_argument("--messages", type=int, default=200, help="pairs: messages per sender")
    ap.add_argument("--idle", type=int, default=0, help="idle: devices over the largest count")
    ap.add_argument("--only", default="pairs,idle")
    ap.add_argument("--name", default="scaleout")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
