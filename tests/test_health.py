"""server/health.py: the readiness probe bounds each check, names what failed, and costs at most
one check per cache period however many probes arrive."""

from __future__ import annotations

import asyncio

from kluis.server.health import NOT_READY, Readiness, ReadinessProbe


class Part:
    """A check that answers, fails or hangs, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.mode = "ok"

    async def __call__(self) -> None:
        self.calls += 1
        if self.mode == "error":
            raise ConnectionError("db.internal:5432 refused")
        if self.mode == "hang":
            await asyncio.sleep(60)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_ready_when_every_part_answers() -> None:
    store, redis = Part(), Part()
    probe = ReadinessProbe({"store": store, "redis": redis}, timeout_s=0.2, cache_s=0)
    readiness = await probe.readiness()
    assert readiness.ready and readiness.body() == {"status": "ready"}
    assert (store.calls, redis.calls) == (1, 1)


async def test_a_failing_part_and_a_hanging_part_are_named_without_their_error_text() -> None:
    store, redis = Part(), Part()
    store.mode, redis.mode = "error", "hang"
    probe = ReadinessProbe({"store": store, "redis": redis}, timeout_s=0.05, cache_s=0)
    readiness = await probe.readiness()
    assert not readiness.ready
    body = readiness.body()
    assert body == {
        "status": "unavailable",
        "code": NOT_READY,
        "message": "not ready (redis: timeout, store: error)",
        "failed": {"store": "error", "redis": "timeout"},
    }
    assert "db.internal" not in str(body)  # the cause goes to the log only


async def test_a_result_is_reused_for_the_cache_period_and_probes_share_one_check() -> None:
    store, clock = Part(), Clock()
    probe = ReadinessProbe({"store": store}, timeout_s=1, cache_s=1.0, clock=clock)
    results = await asyncio.gather(*(probe.readiness() for _ in range(50)))
    assert all(r.ready for r in results) and store.calls == 1
    store.mode = "error"
    clock.now += 0.5
    assert (await probe.readiness()).ready and store.calls == 1  # still the cached answer
    clock.now += 0.6
    assert (await probe.readiness()).failed == {"store": "error"} and store.calls == 2
    store.mode = "ok"
    clock.now += 1.1
    assert (await probe.readiness()).ready and store.calls == 3


async def test_a_probe_that_hangs_up_does_not_cancel_the_shared_check() -> None:
    store = Part()
    store.mode = "hang"
    probe = ReadinessProbe({"store": store}, timeout_s=0.1, cache_s=0)
    first = asyncio.ensure_future(probe.readiness())
    second = asyncio.ensure_future(probe.readiness())
    await asyncio.sleep(0.01)
    first.cancel()
    assert (await second).failed == {"store": "timeout"}
    assert store.calls == 1


def test_no_failure_means_ready() -> None:
    assert Readiness().ready and not Readiness({"store": "error"}).ready
