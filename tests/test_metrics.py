"""server/metrics.py: store calls timed by method, and the metrics application's token."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from kluis.errors import LocalProtocolError
from kluis.server.app import check_metrics_address
from kluis.server.config import ServerConfig
from kluis.server.metrics import Metrics, is_loopback, metrics_app, timed_store
from kluis.server.store.sqlite import SqliteStore
from tests.kluis_testing import free_port


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_store_calls_are_timed_under_their_method_name(tmp_path: Path) -> None:
    metrics = Metrics(process=False)
    raw = SqliteStore(tmp_path / "kluis.sqlite3")
    store = timed_store(raw, metrics)
    try:
        assert await store.account("nobody") is None
        assert await store.account("nobody") is None
        assert await store.count_envelopes("nodevice") == 0
        assert store.footprint() == raw.footprint()  # plain methods pass through untimed
    finally:
        await store.close()
    seen = samples(metrics.render().decode())
    assert seen[("kluis_store_call_seconds_count", (("call", "account"),))] == 2
    assert seen[("kluis_store_call_seconds_count", (("call", "count_envelopes"),))] == 1
    assert seen[("kluis_store_call_seconds_count", (("call", "close"),))] == 1


async def test_a_metrics_token_is_required_when_set() -> None:
    metrics = Metrics(process=False)
    metrics.error("rate_limited")
    runner = web.AppRunner(metrics_app(metrics, "s3cret"), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as r:
                assert r.status == 401
                assert (await r.json())["code"] == "unauthenticated"
            async with http.get(url, headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
            async with http.get(url, headers={"Authorization": "Bearer s3cret"}) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                seen = samples(await r.text())
            async with http.get(url.replace("/metrics", "/healthz")) as r:
                assert r.status == 404  # the metrics port serves /metrics and nothing else
    finally:
        await runner.cleanup()
    assert seen[("kluis_errors_total", (("code", "rate_limited"),))] == 1


def test_loopback_addresses() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.org"))


def test_histogram_buckets_are_cumulative_and_inclusive_of_their_bound() -> None:
    metrics = Metrics(process=False)
    for value in (0.0005, 0.003, 20.0):  # on a bound, between two, above them all
        metrics.send_seconds.observe(value)
    seen = samples(metrics.render().decode())
    bucket = {
        labels[0][1]: value
        for (name, labels), value in seen.items()
        if name == "kluis_send_seconds_bucket"
    }
    assert (bucket["0.0005"], bucket["0.001"], bucket["0.0025"], bucket["0.005"]) == (1, 1, 1, 2)
    assert (bucket["10.0"], bucket["+Inf"]) == (2, 3)
    assert seen[("kluis_send_seconds_count", ())] == 3
    assert seen[("kluis_send_seconds_sum", ())] == 20.0035


def test_every_error_code_a_server_sends_is_listed_from_the_start() -> None:
    seen = samples(Metrics(process=False).render().decode())
    errors = {labels[0][1]: v for (name, labels), v in seen.items() if name == "kluis_errors_total"}
    assert errors["internal"] == 0 and errors["rate_limited"] == 0 and errors["bad_frame"] == 0
    assert set(errors.values()) == {0}


def test_the_metrics_address_is_checked_before_anything_listens() -> None:
    base = ServerConfig(data_dir=Path("/d"), port=8448)
    check_metrics_address(base)  # no metrics: nothing to check
    check_metrics_address(replace(base, metrics_port=9448))
    with pytest.raises(LocalProtocolError, match="must differ from the public --port"):
        check_metrics_address(replace(base, metrics_port=8448))
    with pytest.raises(LocalProtocolError, match=r"metrics on 10\.0\.0\.5 \(not loopback\)"):
        check_metrics_address(replace(base, metrics_port=9448, metrics_host="10.0.0.5"))
    check_metrics_address(
        replace(base, metrics_port=9448, metrics_host="10.0.0.5", metrics_token="t")
    )
