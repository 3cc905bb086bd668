"""Plots for BENCHMARKS.md from bench/results/*.json (matplotlib, PNG in bench/plots/).

    python -m bench.plots

- latency.png: end-to-end latency distribution (CDF) of pairs and paced, with Synapse's
  percentiles from the same run when bench/results/synapse-*.json exist;
- throughput_vs_connections.png: pairs throughput with N idle authenticated devices connected;
- rss_vs_connections.png: server RSS with N idle authenticated devices connected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.common import RESULTS, ROOT

PLOTS = ROOT / "bench" / "plots"


def _load(name: str) -> Any:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def latency() -> Path | None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for name, colour in (("pairs", "tab:blue"), ("paced", "tab:green")):
        lat = _load(f"raw/{name}-latencies-ms.json")
        if not lat:
            continue
        lat = sorted(lat)
        n = len(lat)
        ax.plot(lat, [(i + 1) / n for i in range(n)], color=colour, label=f"Kluis {name} (n={n})")
        drawn = True
        syn = _load(f"synapse-{name}.json")
        if syn:
            xs = [syn["e2e_ms_p50"], syn["e2e_ms_p90"], syn["e2e_ms_p99"]]
            ax.plot(xs, [0.5, 0.9, 0.99], "o--", color=colour, alpha=0.6, label=f"Synapse {name}")
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency, ms (log scale)")
    ax.set_ylabel("fraction of messages")
    ax.set_title("Send to receipt, 25 pairs on loopback (Synapse: p50/p90/p99)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, "latency.png")


def _idle_points(sub: str = "") -> list[dict[str, Any]]:
    idle = _load(f"{sub}idle.json")
    points = list(idle.get("steps", [])) if idle else []
    return sorted(points, key=lambda s: s.get("connections_held", 0))


def _throughput_series(sub: str) -> tuple[list[int], list[float], list[Any]]:
    pts = _idle_points(sub)
    pairs = _load(f"{sub}pairs.json")
    xs = [0] if pairs else []
    ys = [pairs["send_throughput_msg_s"]] if pairs else []
    others = [pairs.get("other_cpu_pct_during_send")] if pairs else []
    xs += [p["connections_held"] for p in pts]
    ys += [p["pairs_send_throughput_msg_s"] for p in pts]
    others += [p.get("pairs_other_cpu_pct_during_send") for p in pts]
    return xs, ys, others


def throughput_vs_connections() -> Path | None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for sub, colour, label in (
        ("", "tab:blue", "Kluis pairs, bench-compare run (machine shared)"),
        ("quiet/", "tab:orange", "Kluis pairs, rerun (bench/results/quiet/)"),
    ):
        xs, ys, others = _throughput_series(sub)
        if len(xs) < 2:
            continue
        drawn = True
        ax.plot(xs, ys, "o-", color=colour, label=label)
        for x, y, other in zip(xs, ys, others, strict=True):
            if isinstance(other, int | float):  # other processes' CPU use meanwhile
                ax.annotate(
                    f"others {max(0.0, other):.0f}%",
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, -12),
                    fontsize=7,
                    color=colour,
                )
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(8000, color="grey", ls=":", label="target 8,000 msg/s")
    return _finish(
        fig,
        ax,
        "idle authenticated devices connected to the same server process",
        "send throughput, messages/s (25 pairs x 200)",
        "Throughput with N devices connected (one process, SQLite)",
        "throughput_vs_connections.png",
    )


def rss_vs_connections() -> Path | None:
    pts = _idle_points()
    if not pts:
        return None
    xs = [0] + [p["connections_held"] for p in pts]
    ys = [pts[0]["server_rss_start_mb"]] + [p["server_rss_idle_mb"] for p in pts]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(xs, ys, "o-", color="tab:purple", label="Kluis server RSS")
    ax.axhline(800, color="grey", ls=":", label="target 800 MiB at 19,000")
    return _finish(
        fig,
        ax,
        "idle authenticated devices connected",
        "server RSS, MiB",
        "Memory per connected device (one server process)",
        "rss_vs_connections.png",
    )


def _finish(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, name: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, name)


def _save(fig: Any, name: str) -> Path:
    PLOTS.mkdir(parents=True, exist_ok=True)
    path = PLOTS / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    for make in (latency, throughput_vs_connections, rss_vs_connections):
        path = make()
        print(f"{make.__name__}: {path or 'no data yet'}")


if __name__ == "__main__":
    main()
