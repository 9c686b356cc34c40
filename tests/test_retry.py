"""Retry budget and retry eligibility."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.logic.retry import RetryBudget


def requests(budget: RetryBudget, n: int, now: float = 0.0) -> RetryBudget:
    for _ in range(n):
        budget.request(now)
    return budget


def take_all(budget: RetryBudget, now: float = 0.0) -> int:
    n = 0
    while budget.try_retry(now):
        n += 1
        assert n < 10_000
    return n


def test_the_floor_allows_retries_when_idle() -> None:
    budget = RetryBudget(0.2, min_per_second=10.0)  # 10/s over a 10 s window: 100
    assert take_all(budget) == 100
    snap = budget.snapshot(0.0)
    assert (snap.limit, snap.window_retries, snap.retries, snap.denied) == (100, 100, 100, 1)


@pytest.mark.parametrize(
    ("ratio", "requests_made", "allowed"),
    [(0.2, 100, 20), (0.2, 104, 20), (0.2, 105, 21), (0.29, 100, 29), (1.0, 7, 7), (0.0, 50, 0)],
)
def test_retries_are_a_share_of_the_window_requests(
    ratio: float, requests_made: int, allowed: int
) -> None:
    budget = requests(RetryBudget(ratio, min_per_second=0.0), requests_made)
    assert take_all(budget) == allowed
    assert budget.snapshot(0.0).limit == allowed
    assert repr(budget) == (
        f"<RetryBudget retries={allowed}/{allowed} requests={requests_made} in 10s"
        f" budget={ratio:g} min_per_second=0 denied=1>"
    )


def test_a_burst_of_retries_is_let_through() -> None:
    """The failure that motivated the window: a few requests in flight, all failing at once.
    A budget on concurrent retries (max(0.2 x 16 in flight, 3)) refused the fourth; this one
    counts the recent requests, and the floor covers a quiet proxy."""
    budget = requests(RetryBudget(0.2, min_per_second=10.0), 1000, now=5.0)
    assert all(budget.try_retry(5.0) for _ in range(16))


def test_old_requests_and_retries_leave_the_window() -> None:
    budget = RetryBudget(0.5, min_per_second=0.0, window=10.0, buckets=10)
    requests(budget, 10, now=0.5)
    assert take_all(budget, now=0.5) == 5
    requests(budget, 10, now=4.5)
    assert take_all(budget, now=4.5) == 5  # 20 requests, 10 retries
    # At 10.5 the bucket of 0..1 s has left the window: its 10 requests and 5 retries.
    assert budget.snapshot(10.5).requests == 10
    assert not budget.try_retry(10.5)  # 5 retries against 0.5 x 10
    requests(budget, 2, now=10.5)
    assert budget.try_retry(10.5)
    # Long after, the window is empty again.
    snap = budget.snapshot(100.0)
    assert (snap.requests, snap.window_retries, snap.limit) == (0, 0, 0)
    assert (snap.retries, snap.denied) == (11, 3)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="budget must be"):
        RetryBudget(-0.1)
    with pytest.raises(ValueError, match="min_per_second must be"):
        RetryBudget(0.2, min_per_second=-1)
    with pytest.raises(ValueError, match="window must be"):
        RetryBudget(0.2, window=0.0)


@settings(max_examples=200, deadline=None)
@given(
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]),
    floor=st.sampled_from([0.0, 0.1, 0.5, 2.0]),
    ops=st.lists(
        st.tuples(st.sampled_from(["request", "retry"]), st.floats(0.0, 3.0)), max_size=300
    ),
)
def test_retries_never_exceed_the_budget(
    ratio: float, floor: float, ops: list[tuple[str, float]]
) -> None:
    """Against a plain list of every event. The ten buckets reach back between 9 and 10 s, so
    at every retry: the retries of the last 9 s stay within ratio x the requests of the last
    10 s + floor x 10."""
    budget = RetryBudget(ratio, min_per_second=floor, window=10.0, buckets=10)
    now = 0.0
    events: list[tuple[float, str]] = []
    for op, step in ops:
        now += step
        if op == "request":
            budget.request(now)
            events.append((now, "request"))
        elif budget.try_retry(now):
            events.append((now, "retry"))
            retries = sum(1 for at, kind in events if kind == "retry" and at > now - 9.0)
            made = sum(1 for at, kind in events if kind == "request" and at > now - 10.0)
            assert retries <= ratio * made + floor * 10.0 + 1e-9
