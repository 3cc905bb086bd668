"""How long the clients of a killed node take to be connected again elsewhere.

Run by hand: ``python -m bench.nodes [--clients 300] [--nodes 3] [--signal kill|term]``.
Starts ``--nodes`` real ``kluis serve`` processes on one scratch PostgreSQL database (created
and dropped here, on ``KLUIS_TEST_POSTGRES``) routing over Redis (``KLUIS_TEST_REDIS``, with a
fresh key prefix), behind the loopback TCP balancer of ``tests/loadbalancer.py``. Registers
``--clients`` accounts through the balancer (round-robin: a third on each node), keeps each
connected with :class:`~kluis.client.reconnect.ReconnectingSession` and the default back-off
(full jitter from 0.5 s), then sends node 0 SIGKILL (or SIGTERM: the drain) and measures, for
every client that was on it, the time from the signal to its next login on another node.

Prints and writes ``bench/results/nodes-<signal>.json``: p50, p90, p99 and max in ms from the
signal to the next login (``reconnect_ms_*``) and to the client's noticing the drop
(``noticed_ms_*``), the logins alone, back-off waits left out (``login_ms_*``), how many
clients moved, how many attempts failed on the way, and the CPU seconds the client process and
the surviving nodes spent meanwhile. One Python process runs every client (the
logins are signed and checked there), so the figure includes the client side's CPU as well.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from tests.cluster import Cluster, cluster_of, join
from tests.loadbalancer import Balancer
from tests.test_delivery_redis import _redis_reachable

from bench.common import RESULTS, latency_fields, machine, raise_nofile
from kluis.client.backoff import BackoffPolicy
from kluis.client.client import KluisClient
from kluis.client.events import ConnectionDown, ConnectionUp, Event
from kluis.client.reconnect import ReconnectingSession


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


class Watch:
    """One client: when it logged in, and when its connections ended (monotonic clock)."""

    def __init__(self) -> None:
        self.ups: list[float] = []
        self.downs: list[float] = []
        self.slept = 0.0  # back-off waits, in seconds

    async def sleep(self, seconds: float) -> None:
        self.slept += seconds
        await asyncio.sleep(seconds)

    def on_event(self, event: Event) -> None:
        if isinstance(event, ConnectionUp):
            self.ups.append(time.monotonic())
        elif isinstance(event, ConnectionDown):
            self.downs.append(time.monotonic())


async def measure(cluster: Cluster, root: Path, clients: int, signum: int) -> dict[str, Any]:
    victim = cluster.nodes[0]
    async with Balancer(cluster.backends, port=cluster.public_port) as lb:
        made: list[KluisClient] = []
        sessions: list[ReconnectingSession] = []
        watches: list[Watch] = []
        try:
            t0 = time.monotonic()
            for start in range(0, clients, 20):  # 20 registrations at a time
                batch = range(start, min(clients, start + 20))
                made += await asyncio.gather(*(join(cluster, root / f"c{i}") for i in batch))
            print(f"registered {clients} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
            for client in made:
                watch = Watch()
                session = ReconnectingSession(
                    client, BackoffPolicy(), on_event=watch.on_event, sleep=watch.sleep
                )
                session.start()
                sessions.append(session)
                watches.append(watch)
            for session in sessions:
                await session.wait_connected(60)
            on_victim = lb.active[("127.0.0.1", victim.port)]
            assert victim.proc is not None
            others = [psutil.Process(n.proc.pid) for n in cluster.nodes[1:] if n.proc]
            load = os.getloadavg()[0]
            cpu0 = time.process_time(), sum(_cpu(p) for p in others)
            killed_at = time.monotonic()
            victim.proc.send_signal(signum)
            await asyncio.to_thread(victim.proc.wait, 60)
            exited = time.monotonic() - killed_at
            moved = [i for i, s in enumerate(sessions) if s.downs]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                moved = [i for i, s in enumerate(sessions) if s.downs]
                if len(moved) >= on_victim and all(sessions[i].connected for i in moved):
                    break
                await asyncio.sleep(0.05)
            window = time.monotonic() - killed_at
            cpu = time.process_time() - cpu0[0], sum(_cpu(p) for p in others) - cpu0[1]
            back = [watches[i].ups[-1] - killed_at for i in moved if sessions[i].connected]
            noticed = [watches[i].downs[0] - killed_at for i in moved]
            # From the drop to the login, less the back-off waits: the logins themselves.
            logins = [
                watches[i].ups[-1] - watches[i].downs[0] - watches[i].slept
                for i in moved
                if sessions[i].connected
            ]
            failed = sum(len(sessions[i].downs) - 1 for i in moved)
            return {
                "label": f"nodes-{signal.Signals(signum).name.lower()}",
                "nodes": len(cluster.nodes),
                "clients": clients,
                "clients_on_victim": on_victim,
                "clients_moved": len(moved),
                "clients_back": len(back),
                "failed_attempts": failed,
                "going_away_closes": sum(sessions[i].downs[0].close_code == 1001 for i in moved),
                **{k.replace("e2e", "reconnect"): v for k, v in latency_fields(back).items()},
                "reconnect_ms_min": min(back, default=float("nan")) * 1e3,
                # From the signal to the client's ConnectionDown: how soon the drop is seen.
                **{k.replace("e2e", "noticed"): v for k, v in latency_fields(noticed).items()},
                **{k.replace("e2e", "login"): v for k, v in latency_fields(logins).items()},
                # CPU seconds from the signal until every moved client was back (window_s):
                # the one client process, and the surviving nodes together. A client CPU near
                # the window means the login work of the clients, not the nodes, set the pace.
                "victim_exit_s": exited,  # from the signal to the node's exit
                "window_s": window,
                "client_cpu_s": cpu[0],
                "nodes_cpu_s": cpu[1],
                "load_average_1m": load,
                "machine": machine(),
            }
        finally:
            for session in sessions:
                await session.stop()
            for client in made:
                await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.nodes", description=__doc__)
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--signal", choices=["kill", "term"], default="kill")
    args = parser.parse_args()
    if not 1 <= args.clients <= 5000 or not 2 <= args.nodes <= 10:
        raise SystemExit("--clients 1..5000, --nodes 2..10")
    raise_nofile()
    signum = signal.SIGKILL if args.signal == "kill" else signal.SIGTERM
    reason = asyncio.run(_redis_reachable())
    if reason is not None:
        raise SystemExit(reason)
    with tempfile.TemporaryDirectory(prefix="kluis-bench-nodes-") as tmp:
        root = Path(tmp)
        with cluster_of(root, args.nodes, licences=args.clients) as cluster:
            result = asyncio.run(measure(cluster, root, args.clients, signum))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{result['label']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
