"""Kluis next to Matrix Synapse, measured on this machine in the same run.

    python -m bench.compare [--peer ../shared/bench-peer] [--skip-synapse] [--quick]

Runs the peer folder's ``setup.sh`` when its work folder ($BENCH_PEER_DIR) has no venv yet, then
its ``run_synapse_bench.sh`` for the pairs and paced workloads (the peer folder stays read-only;
everything it writes goes to $BENCH_PEER_DIR), copies the peer's JSON next to Kluis's in
bench/results/, and prints one markdown table with ratios (also written to
bench/results/compare.md). Kluis's own figures are read from bench/results/*.json, so run
``python -m bench.run`` first (``make bench-compare`` does both).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT


def peer_dir() -> Path:
    default = Path(os.environ.get("TMPDIR", "/tmp")) / "kluis-bench-peer"
    return Path(os.environ.get("BENCH_PEER_DIR", str(default)))


def run_synapse(peer: Path, label: str, args: list[str]) -> dict[str, Any] | None:
    work = peer_dir()
    env = {**os.environ, "BENCH_PEER_DIR": str(work)}
    if (
        not (work / "venv" / "bin" / "python").exists()
        or not (work / "hs" / "homeserver.yaml").exists()
    ):
        print("setting up the Synapse peer (once, ~2 min) ...", flush=True)
        subprocess.run([str(peer / "setup.sh")], check=True, env=env, timeout=900)
    print(f"running Synapse: {label} {' '.join(args)}", flush=True)
    proc = subprocess.run(
        [str(peer / "run_synapse_bench.sh"), label, *args], env=env, timeout=420, check=False
    )
    src = work / "results" / f"{label}.json"
    if proc.returncode != 0 or not src.exists():
        print(f"Synapse run {label} failed (exit {proc.returncode})")
        return None
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, RESULTS / f"{label}.json")
    data: dict[str, Any] = json.loads(src.read_text())
    return data


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _num(r: dict[str, Any] | None, key: str) -> float | None:
    if r is None:
        return None
    v = r.get(key)
    return float(v) if isinstance(v, int | float) else None


def _fmt(v: float | None, nd: int = 1) -> str:
    return "—" if v is None else f"{v:,.{nd}f}"


def _ratio(k: float | None, s: float | None, higher_is_better: bool) -> str:
    if k is None or s is None or k == 0 or s == 0:
        return "—"
    r = k / s if higher_is_better else s / k
    return f"{r:,.1f}x"


ROWS = [
    # (workload, label, key, decimals, higher is better)
    ("pairs", "send throughput, msg/s", "send_throughput_msg_s", 0, True),
    ("pairs", "e2e p50, ms", "e2e_ms_p50", 2, False),
    ("pairs", "e2e p90, ms", "e2e_ms_p90", 2, False),
    ("pairs", "e2e p99, ms", "e2e_ms_p99", 2, False),
    ("pairs", "e2e max, ms", "e2e_ms_max", 1, False),
    ("pairs", "messages received / sent", "messages_received", 0, True),
    ("pairs", "server CPU % during send", "server_cpu_pct_during_send", 0, False),
    ("pairs", "server RSS peak, MB", "server_rss_peak_mb", 0, False),
    ("paced", "send throughput, msg/s", "send_throughput_msg_s", 1, True),
    ("paced", "e2e p50, ms", "e2e_ms_p50", 2, False),
    ("paced", "e2e p90, ms", "e2e_ms_p90", 2, False),
    ("paced", "e2e p99, ms", "e2e_ms_p99", 2, False),
    ("paced", "e2e max, ms", "e2e_ms_max", 1, False),
    ("paced", "server CPU % during send", "server_cpu_pct_during_send", 1, False),
    ("paced", "server RSS peak, MB", "server_rss_peak_mb", 0, False),
    ("pairs-crypto", "send throughput, msg/s", "send_throughput_msg_s", 0, True),
    ("pairs-crypto", "e2e p50, ms", "e2e_ms_p50", 1, False),
    ("pairs-crypto", "e2e p99, ms", "e2e_ms_p99", 1, False),
    ("paced-crypto", "e2e p50, ms", "e2e_ms_p50", 2, False),
    ("paced-crypto", "e2e p99, ms", "e2e_ms_p99", 2, False),
]


def table(
    kluis: dict[str, dict[str, Any] | None], synapse: dict[str, dict[str, Any] | None]
) -> str:
    lines = [
        "| workload | figure | Kluis | Synapse | Kluis vs Synapse |",
        "|---|---|---|---|---|",
    ]
    for wl, label, key, nd, hib in ROWS:
        k, s = _num(kluis.get(wl), key), _num(synapse.get(wl), key)
        ratio = _ratio(k, s, hib) if key != "messages_received" else ""
        if key == "messages_received":
            kr, sr = kluis.get(wl), synapse.get(wl)
            kt = f"{_fmt(k, 0)} / {_fmt(_num(kr, 'messages_sent'), 0)}"
            st = f"{_fmt(s, 0)} / {_fmt(_num(sr, 'messages_sent'), 0)}"
            lines.append(f"| {wl} | {label} | {kt} | {st} | |")
            continue
        lines.append(f"| {wl} | {label} | {_fmt(k, nd)} | {_fmt(s, nd)} | {ratio} |")
    burst, idle = load("burst"), load("idle")
    if burst:
        lines.append(
            f"| burst | 10,000 queued envelopes drained, s | {_fmt(_num(burst, 'drain_s'), 3)} "
            "| — | |"
        )
    if idle:
        lines.append(
            f"| idle | authenticated connections held | {_fmt(_num(idle, 'connections_held'), 0)} "
            "| — | |"
        )
        lines.append(
            f"| idle | server RSS with them, MB | {_fmt(_num(idle, 'server_rss_peak_mb'), 0)} "
            "| — | |"
        )
    lines.append("")
    lines.append(
        "Ratios: throughput Kluis/Synapse; latency, CPU and RSS Synapse/Kluis (above 1x = Kluis "
        "better). The -crypto rows are Kluis with real vodozemac clients beside plain Synapse."
    )
    other = _num(kluis.get("pairs"), "other_cpu_pct_during_send")
    if other is not None:
        lines.append(
            f"Other processes used {other:.0f}% of a core during Kluis's pairs send phase "
            "(this machine is shared)."
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--peer", default=str(ROOT.parent / "shared" / "bench-peer"))
    ap.add_argument("--skip-synapse", action="store_true", help="reuse bench/results/synapse-*")
    ap.add_argument("--quick", action="store_true", help="paced with 20 messages per sender")
    args = ap.parse_args()
    peer = Path(args.peer).resolve()
    synapse: dict[str, dict[str, Any] | None] = {}
    if args.skip_synapse:
        synapse = {"pairs": load("synapse-pairs"), "paced": load("synapse-paced")}
    else:
        if not (peer / "run_synapse_bench.sh").exists():
            raise SystemExit(f"no bench-peer scripts in {peer}")
        synapse["pairs"] = run_synapse(
            peer, "synapse-pairs", ["--users", "50", "--messages", "200"]
        )
        paced_msgs = "20" if args.quick else "100"
        synapse["paced"] = run_synapse(
            peer, "synapse-paced", ["--users", "50", "--messages", paced_msgs, "--rate", "40"]
        )
    kluis = {name: load(name) for name in ("pairs", "paced", "pairs-crypto", "paced-crypto")}
    # Kluis with real E2E crypto is set beside plain Synapse (the peer's E2E script is not run)
    synapse["pairs-crypto"], synapse["paced-crypto"] = synapse["pairs"], synapse["paced"]
    text = table(kluis, synapse)
    (RESULTS / "compare.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
