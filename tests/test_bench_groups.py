"""Smoke test of the group fan-out generator (bench/groups.py): tiny groups, real servers.

No timing is asserted: only that every member gets every group message, nothing errs, and the
result carries the figures the table prints.
"""

from __future__ import annotations

import pytest

pytest.importorskip("picows")

from bench.groups import fanout_workload, table
from bench.groups_crypto import crypto_group_workload


async def test_fanout_reaches_every_member() -> None:
    res = await fanout_workload("smoke-group", members=6, messages=4)
    assert res["messages_sent"] == res["messages_complete"] == 4
    assert res["envelopes_received"] == 24
    assert res["envelopes_lost"] == 0
    assert res["errors"] == 0
    assert res["connections_held"] == 7
    assert len(res.pop("_latencies_ms")) == 4
    assert "smoke-group" in table([res])


async def test_paced_fanout() -> None:
    res = await fanout_workload("smoke-group-paced", members=3, messages=3, rate=20.0)
    assert res["messages_complete"] == 3
    assert res["target_rate_msg_s"] == 20.0


async def test_crypto_group_decrypts_everywhere() -> None:
    res = await crypto_group_workload("smoke-group-crypto", members=3, messages=2, rate=10.0)
    assert res["messages_complete"] == 2
    assert res["envelopes_received_decrypted"] == 6
    assert res["errors"] == 0
