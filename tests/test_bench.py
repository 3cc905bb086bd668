"""Smoke test of the load generator: tiny workloads against a real server, valid JSON out.

No timing is asserted: only that the generator speaks the protocol end to end, loses nothing,
and writes the field names of ../shared/bench-peer/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("picows")

from bench.common import write_result
from bench.workloads import burst_workload, pairs_workload

PEER_FIELDS = [
    "label",
    "users",
    "pairs",
    "messages_per_sender",
    "target_rate_msg_s",
    "messages_sent",
    "messages_received",
    "send_throughput_msg_s",
    "e2e_ms_p50",
    "e2e_ms_p90",
    "e2e_ms_p99",
    "e2e_ms_max",
    "server_cpu_pct_during_send",
    "server_rss_start_mb",
    "server_rss_peak_mb",
    "server_rss_end_mb",
]


async def test_pairs_writes_peer_fields(tmp_path: Path) -> None:
    res = await pairs_workload("smoke-pairs", users=4, messages=5)
    res.pop("_latencies_ms")
    path = write_result("pairs", res, tmp_path)
    data = json.loads(path.read_text())
    for key in PEER_FIELDS:
        assert key in data, key
    assert data["messages_sent"] == data["messages_received"] == 10
    assert data["errors"] == 0
    assert data["connections_held"] == 4


async def test_burst_drains_everything() -> None:
    res = await burst_workload("smoke-burst", envelopes=40, receivers=4, senders=2)
    assert res["messages_received"] == 40
    assert res["envelopes_left_after_acks"] == 0
    assert res["errors"] == 0
