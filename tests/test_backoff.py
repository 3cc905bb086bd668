"""The reconnection rules (client/backoff.py), with an injected clock and random source."""

from __future__ import annotations

import pytest

from kluis.client.backoff import Backoff, BackoffPolicy, Endpoints, delay
from kluis.errors import LocalProtocolError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_full_jitter_spans_zero_to_a_doubling_capped_ceiling() -> None:
    policy = BackoffPolicy(base_s=0.5, cap_s=8.0)
    tops = [policy.delay(n, lambda: 0.999999) for n in range(10)]
    assert [round(t, 3) for t in tops] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    assert all(policy.delay(n, lambda: 0.0) == 0.0 for n in range(10))  # full: down to zero
    assert policy.delay(3, lambda: 0.5) == 2.0
    assert policy.delay(10**9, lambda: 0.5) == 4.0  # a huge attempt count does not overflow


def test_equal_jitter_keeps_half_fixed() -> None:
    assert delay(0, lambda: 0.0, 0.5, 30.0, "equal") == 0.25
    assert delay(0, lambda: 1.0, 0.5, 30.0, "equal") == 0.5
    assert delay(20, lambda: 0.0, 0.5, 30.0, "equal") == 15.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_s": 0.0},
        {"base_s": 2.0, "cap_s": 1.0},
        {"stable_after_s": -1.0},
        {"going_away_spread_s": -0.1},
        {"jitter": "none"},
    ],
)
def test_a_bad_policy_is_a_local_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError) as info:
        BackoffPolicy(**kwargs)  # type: ignore[arg-type]
    assert info.value.code == "local_protocol" and "back-off" in info.value.message


def test_failures_in_a_row_grow_and_a_stable_connection_resets_them() -> None:
    clock = Clock()
    state = Backoff(
        BackoffPolicy(base_s=1.0, cap_s=60.0, stable_after_s=10.0), clock=clock, random=lambda: 0.5
    )
    assert [state.down() for _ in range(4)] == [0.5, 1.0, 2.0, 4.0]  # attempts that failed
    state.up()
    clock.now += 3.0  # up, but not for long: a node that accepts and drops
    assert state.down() == 8.0
    state.up()
    clock.now += 10.0  # stable: the next drop starts over
    assert state.down() == 0.5
    assert state.attempt == 1


def test_going_away_reconnects_within_the_spread_without_back_off() -> None:
    clock = Clock()
    policy = BackoffPolicy(base_s=1.0, stable_after_s=10.0, going_away_spread_s=0.4)
    state = Backoff(policy, clock=clock, random=lambda: 0.5)
    for _ in range(5):
        state.down()
    state.up()
    clock.now += 0.1  # drained soon after the login: still no back-off
    assert state.down(going_away=True) == pytest.approx(0.2)
    assert state.attempt == 0
    assert state.down() == 0.5  # the node we were sent to refuses: back-off from the start
    # A "going away" without a connection (no login happened) is an ordinary failure.
    assert state.down(going_away=True) == 1.0


def test_endpoints_start_at_random_and_rotate() -> None:
    urls = ["http://127.0.0.1:1", "http://127.0.0.1:2", "ws://127.0.0.1:3"]
    ring = Endpoints(urls, lambda: 0.5)
    assert ring.current == urls[1]
    assert [ring.advance() for _ in range(4)] == [urls[2], urls[0], urls[1], urls[2]]
    assert Endpoints(urls, lambda: 0.9999999).current == urls[2]
    with pytest.raises(LocalProtocolError):
        Endpoints([], lambda: 0.0)
    with pytest.raises(LocalProtocolError, match="not an http"):
        Endpoints(["127.0.0.1:8448"], lambda: 0.0)
