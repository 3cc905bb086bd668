"""Run Kluis's benchmark workloads and write one JSON file per workload into bench/results/.

    python -m bench.run [--quick] [--crypto] [--only pairs,paced,idle,burst]
    python -m bench.run --only groups [--groups 250,1000] [--crypto]   (bench/groups.py)

Each workload starts its own server on loopback and stops it; the whole run is bounded in time.
Field names follow ../shared/bench-peer/README.md so one table holds Kluis and its peers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, machine, raise_nofile, write_result
from bench.workloads import burst_workload, idle_workload, pairs_workload


def _save(name: str, res: dict[str, Any], out: Path) -> None:
    lat = res.pop("_latencies_ms", None)
    if lat is not None:
        raw = out / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        (raw / f"{name}-latencies-ms.json").write_text(json.dumps([round(x, 4) for x in lat]))
    res["machine"] = machine()
    res["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = write_result(name, res, out)
    shown = {k: v for k, v in res.items() if k not in ("steps", "machine", "child_errors")}
    print(f"== {name} -> {path}\n{json.dumps(shown, indent=1)}", flush=True)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput, listing every run's figures beside it."""
    ranked = sorted(runs, key=lambda r: r["send_throughput_msg_s"])
    res = ranked[len(ranked) // 2]
    res["runs"] = len(runs)
    for key in (
        "send_throughput_msg_s",
        "e2e_ms_p50",
        "e2e_ms_p99",
        "server_cpu_pct_during_send",
        "server_cpu_us_per_msg",
        "other_cpu_pct_during_send",
    ):
        res[f"all_runs_{key}"] = [round(r[key], 2) for r in runs]
    return res


async def main(args: argparse.Namespace) -> None:
    raise_nofile()
    out = Path(args.out)
    only = set(args.only.split(","))
    q = args.quick
    mode = "crypto" if args.crypto else "no-crypto"
    if "pairs" in only:
        if args.crypto:
            from bench.crypto_mode import crypto_pairs_workload

            res = await crypto_pairs_workload("kluis-pairs-crypto", 50, 40 if q else 200)
            _save("pairs-crypto", res, out)
        else:
            runs = [
                await pairs_workload("kluis-pairs", 50, args.messages or 200, profile=args.profile)
                for _ in range(1 if q else args.repeat)
            ]
            res = _median_run(runs)
            _save("pairs", res, out)
    if "paced" in only:
        msgs = 20 if q else 100
        if args.crypto:
            from bench.crypto_mode import crypto_pairs_workload

            res = await crypto_pairs_workload("kluis-paced-crypto", 50, msgs, rate=40.0)
            _save("paced-crypto", res, out)
        else:
            res = await pairs_workload("kluis-paced", 50, msgs, rate=40.0)
            _save("paced", res, out)
    if "burst" in only and not args.crypto:
        res = await burst_workload("kluis-burst", envelopes=10_000)
        _save("burst", res, out)
    if "idle" in only and not args.crypto:
        counts = [int(x) for x in args.idle.split(",")] if args.idle else None
        if counts is None:
            counts = [2_000] if q else [5_000, 10_000, 19_000]
        res = await idle_workload("kluis-idle", counts, procs=args.procs)
        _save("idle", res, out)
    if "groups" in only:
        await _groups(args, out)
    print(f"mode {mode}: results in {out}")


async def _groups(args: argparse.Namespace, out: Path) -> None:
    """Group fan-out (bench/groups.py): one sender, N members online, one table at the end."""
    from bench.groups import fanout_workload, table

    rows = []
    sizes = [int(x) for x in args.groups.split(",")]
    if args.crypto:
        from bench.groups_crypto import crypto_group_workload

        for n in sizes:
            res = await crypto_group_workload(
                f"kluis-group-{n}-crypto", n, args.group_messages or 20, rate=args.group_rate
            )
            _save(f"group-{n}-crypto", res, out)
            rows.append(res)
    else:
        for n in sizes:
            msgs = args.group_messages or (20 if args.quick else 100)
            spy = f"{args.profile}-{n}.txt" if args.profile else ""
            res = await fanout_workload(f"kluis-group-{n}", n, msgs, profile=spy)
            _save(f"group-{n}", res, out)
            rows.append(res)
            if args.group_rate:
                res = await fanout_workload(
                    f"kluis-group-{n}-paced", n, msgs // 2, rate=args.group_rate
                )
                _save(f"group-{n}-paced", res, out)
                rows.append(res)
    print(table(rows), flush=True)


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes; under two minutes")
    ap.add_argument("--crypto", action="store_true", help="real vodozemac clients (pairs, paced)")
    ap.add_argument("--only", default="pairs,paced,burst,idle")
    ap.add_argument("--idle", default="", help="comma-separated idle connection counts")
    ap.add_argument("--procs", type=int, default=4, help="idle generator processes")
    ap.add_argument("--repeat", type=int, default=3, help="pairs runs; the median is kept")
    ap.add_argument("--messages", type=int, default=0, help="pairs: messages per sender")
    ap.add_argument(
        "--profile", default="", help="pairs (groups: -N.txt added): py-spy raw stacks to this file"
    )
    ap.add_argument("--groups", default="250,1000", help="groups: member counts")
    ap.add_argument("--group-messages", type=int, default=0, help="groups: messages per run")
    ap.add_argument(
        "--group-rate", type=float, default=0.0, help="groups: also a paced run at this msg/s"
    )
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--deadline", type=float, default=1800.0, help="hard stop for the whole run")
    args = ap.parse_args()
    import uvloop

    uvloop.install()
    asyncio.run(asyncio.wait_for(main(args), args.deadline))


if __name__ == "__main__":
    cli()
