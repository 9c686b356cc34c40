"""Retry budget and retry eligibility."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.retry import RetryBudget, is_retriable_method


def started(budget: RetryBudget, n: int) -> RetryBudget:
    for _ in range(n):
        budget.request_started()
    return budget


def take_all(budget: RetryBudget) -> int:
    n = 0
    while budget.try_begin_retry():
        n += 1
        assert n < 10_000
    return n


def test_floor_allows_retries_when_idle() -> None:
    budget = RetryBudget(0.2)
    assert take_all(budget) == 3
    assert budget.retries_in_flight == 3
    snap = budget.snapshot()
    assert (snap.limit, snap.retries, snap.denied) == (3, 3, 1)


def test_floor_holds_below_the_proportional_limit() -> None:
    budget = started(RetryBudget(0.2, floor=3), 10)  # 0.2 x 10 = 2 < floor
    assert take_all(budget) == 3


@pytest.mark.parametrize(
    ("ratio", "in_flight", "allowed"),
    [(0.2, 100, 20), (0.2, 101, 20), (0.2, 104, 20), (0.2, 105, 21), (0.29, 100, 29), (1.0, 7, 7)],
)
def test_proportional_to_requests_in_flight(ratio: float, in_flight: int, allowed: int) -> None:
    budget = started(RetryBudget(ratio, floor=0), in_flight)
    assert take_all(budget) == allowed
    assert budget.snapshot().limit == allowed
    assert repr(budget) == (
        f"<RetryBudget retries={allowed}/{allowed} in_flight={in_flight}"
        f" budget={ratio:g} floor=0 denied=1>"
    )


def test_end_retry_frees_a_slot() -> None:
    budget = started(RetryBudget(0.5), 10)
    assert take_all(budget) == 5
    budget.end_retry()
    assert budget.retries_in_flight == 4
    assert budget.try_begin_retry()
    assert not budget.try_begin_retry()


def test_fewer_requests_shrink_the_budget_for_new_retries() -> None:
    budget = started(RetryBudget(0.5, floor=1), 10)
    assert take_all(budget) == 5
    for _ in range(6):
        budget.request_finished()
    assert budget.in_flight == 4
    assert budget.retries_in_flight == 5  # retries already running are not revoked
    for _ in range(3):
        budget.end_retry()
    assert budget.retries_in_flight == 2
    assert not budget.try_begin_retry()  # limit is now max(0.5 x 4, 1) = 2
    budget.end_retry()
    assert budget.try_begin_retry()


def test_zero_budget_and_floor_forbids_retries() -> None:
    budget = started(RetryBudget(0.0, floor=0), 1000)
    assert not budget.try_begin_retry()


def test_unmatched_calls_are_errors() -> None:
    budget = RetryBudget(0.2)
    with pytest.raises(RuntimeError):
        budget.end_retry()
    with pytest.raises(RuntimeError):
        budget.request_finished()
    with pytest.raises(ValueError):
        RetryBudget(-0.1)
    with pytest.raises(ValueError):
        RetryBudget(0.2, floor=-1)


@settings(max_examples=200, deadline=None)
@given(
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]),
    floor=st.integers(0, 4),
    ops=st.lists(st.sampled_from(["start", "finish", "retry", "end"]), max_size=200),
)
def test_retries_never_exceed_the_budget(ratio: float, floor: int, ops: list[str]) -> None:
    budget = RetryBudget(ratio, floor=floor)
    requests = retries = 0
    for op in ops:
        if op == "start":
            budget.request_started()
            requests += 1
        elif op == "finish" and requests:
            budget.request_finished()
            requests -= 1
        elif op == "retry":
            limit = max(int(ratio * requests + 1e-9), floor)
            assert budget.try_begin_retry() is (retries + 1 <= limit)
            retries += retries + 1 <= limit
        elif op == "end" and retries:
            budget.end_retry()
            retries -= 1
        assert (budget.in_flight, budget.retries_in_flight) == (requests, retries)


def test_retriable_methods() -> None:
    methods = frozenset({"GET", "HEAD", "OPTIONS"})
    assert is_retriable_method("GET", methods)
    assert is_retriable_method("OPTIONS", methods)
    assert not is_retriable_method("POST", methods)
    assert not is_retriable_method("get", methods)  # methods are case-sensitive (RFC 9110)
    assert not is_retriable_method("GET", frozenset())
