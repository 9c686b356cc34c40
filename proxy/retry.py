"""Retry budget and retry eligibility (DESIGN.md `retries`).

The budget bounds retries in flight, not retries per request: at most
max(budget x requests in flight, floor) at once, so a failing upstream cannot multiply the
load on the rest of the fleet, while a quiet proxy may still retry `floor` requests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["RetryBudget", "RetryBudgetSnapshot", "is_retriable_method"]

# 0.29 * 100 is 28.999999999999996 in binary floating point; the budget means 29.
_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class RetryBudgetSnapshot:
    """A retry budget's state at one instant, for /status and tests."""

    budget: float
    floor: int
    in_flight: int
    retries_in_flight: int
    limit: int
    retries: int
    denied: int


class RetryBudget:
    """Envoy-style retry budget: concurrent retries <= max(budget * requests in flight, floor)."""

    __slots__ = ("_budget", "_denied", "_floor", "_in_flight", "_retries", "_retries_total")

    def __init__(self, budget: float, floor: int = 3) -> None:
        if budget < 0:
            raise ValueError("budget must be >= 0")
        if floor < 0:
            raise ValueError("floor must be >= 0")
        self._budget = budget
        self._floor = floor
        self._in_flight = 0
        self._retries = 0
        self._retries_total = 0
        self._denied = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def retries_in_flight(self) -> int:
        return self._retries

    def request_started(self) -> None:
        self._in_flight += 1

    def request_finished(self) -> None:
        if self._in_flight <= 0:
            raise RuntimeError("RetryBudget.request_finished() without request_started()")
        self._in_flight -= 1

    def try_begin_retry(self) -> bool:
        """Take a retry slot if one more retry stays within the budget; pair with end_retry()."""
        wanted = self._retries + 1
        if wanted <= self._floor or wanted <= self._budget * self._in_flight + _EPS:
            self._retries = wanted
            self._retries_total += 1
            return True
        self._denied += 1
        return False

    def end_retry(self) -> None:
        if self._retries <= 0:
            raise RuntimeError("RetryBudget.end_retry() without try_begin_retry()")
        self._retries -= 1

    def snapshot(self) -> RetryBudgetSnapshot:
        return RetryBudgetSnapshot(
            budget=self._budget,
            floor=self._floor,
            in_flight=self._in_flight,
            retries_in_flight=self._retries,
            limit=self._limit(),
            retries=self._retries_total,
            denied=self._denied,
        )

    def _limit(self) -> int:
        return max(math.floor(self._budget * self._in_flight + _EPS), self._floor)

    def __repr__(self) -> str:
        return (
            f"<RetryBudget retries={self._retries}/{self._limit()}"
            f" in_flight={self._in_flight} budget={self._budget:g} floor={self._floor}"
            f" denied={self._denied}>"
        )


def is_retriable_method(method: str, methods: frozenset[str]) -> bool:
    """Whether requests with `method` may be retried. Methods are case-sensitive
    (RFC 9110 section 9.1), so `methods` holds them as sent: GET, HEAD, OPTIONS."""
    return method in methods
