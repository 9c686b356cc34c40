"""Retry budget and retry eligibility (DESIGN.md `retries`).

The budget bounds retries against requests over a recent window, as Linkerd's and Finagle's
do: retries in the window <= budget x requests in the window + min_per_second x window. A
burst of retries (one upstream's requests in flight all failing at once) is let through,
since the window's requests and the floor cover it; a retry storm (every upstream failing)
adds at most `budget` times the load, plus the floor.
"""

from __future__ import annotations

from dataclasses import dataclass
from time import monotonic
from typing import Final

__all__ = ["RetryBudget", "RetryBudgetSnapshot"]

# 0.29 * 100 is 28.999999999999996 in binary floating point; the budget means 29.
_EPS: Final = 1e-9
WINDOW: Final = 10.0
BUCKETS: Final = 10


@dataclass(frozen=True, slots=True)
class RetryBudgetSnapshot:
    """A retry budget's state at one instant, for /status and tests."""

    budget: float
    min_per_second: float
    window: float
    requests: int  # in the window
    window_retries: int  # in the window
    limit: int  # retries the window allows
    retries: int  # since start
    denied: int  # since start


class RetryBudget:
    """Linkerd-style retry budget: retries over the last `window` seconds <= budget x requests
    over the same window + min_per_second x window. The window is a ring of `buckets` time
    buckets (so it reaches back between window - window/buckets and window), and a request or a
    retry costs two additions and a comparison."""

    __slots__ = (
        "_budget",
        "_denied",
        "_head",
        "_head_end",
        "_min_per_second",
        "_requests",
        "_reserve",
        "_retries",
        "_retries_total",
        "_span",
        "_window",
        "_window_requests",
        "_window_retries",
    )

    def __init__(
        self,
        budget: float,
        min_per_second: float = 10.0,
        *,
        window: float = WINDOW,
        buckets: int = BUCKETS,
    ) -> None:
        if budget < 0:
            raise ValueError("budget must be >= 0")
        if min_per_second < 0:
            raise ValueError("min_per_second must be >= 0")
        if window <= 0 or buckets < 1:
            raise ValueError("window must be > 0 and buckets >= 1")
        self._budget = budget
        self._min_per_second = min_per_second
        self._window = window
        self._reserve = min_per_second * window
        self._span = window / buckets
        self._requests = [0] * buckets
        self._retries = [0] * buckets
        self._head = 0
        self._head_end = float("-inf")
        self._window_requests = 0
        self._window_retries = 0
        self._retries_total = 0
        self._denied = 0

    def _advance(self, now: float) -> None:
        """Move the window so that its newest bucket holds `now` (rare: once per bucket)."""
        if now < self._head_end:
            return
        span = self._span
        buckets = len(self._requests)
        behind = now - self._head_end
        if behind >= self._window:  # also the first call, from -inf
            for i in range(buckets):
                self._requests[i] = 0
                self._retries[i] = 0
            self._window_requests = 0
            self._window_retries = 0
            self._head_end = now + span
            return
        steps = int(behind // span) + 1
        head = self._head
        for _ in range(steps):
            head = (head + 1) % buckets
            self._window_requests -= self._requests[head]
            self._window_retries -= self._retries[head]
            self._requests[head] = 0
            self._retries[head] = 0
        self._head = head
        self._head_end += steps * span

    def request(self, now: float) -> None:
        """A client request began (at `now`, monotonic seconds): it adds to the budget."""
        if now >= self._head_end:
            self._advance(now)
        self._requests[self._head] += 1
        self._window_requests += 1

    def try_retry(self, now: float) -> bool:
        """Take one retry if it stays within the budget; counts a refusal otherwise."""
        if now >= self._head_end:
            self._advance(now)
        allowed = self._budget * self._window_requests + self._reserve + _EPS
        if self._window_retries + 1 <= allowed:
            self._retries[self._head] += 1
            self._window_retries += 1
            self._retries_total += 1
            return True
        self._denied += 1
        return False

    def snapshot(self, now: float | None = None) -> RetryBudgetSnapshot:
        """The state at `now` (default: the monotonic clock, which the data path's times use)."""
        self._advance(monotonic() if now is None else now)
        return RetryBudgetSnapshot(
            budget=self._budget,
            min_per_second=self._min_per_second,
            window=self._window,
            requests=self._window_requests,
            window_retries=self._window_retries,
            limit=self._limit(),
            retries=self._retries_total,
            denied=self._denied,
        )

    def _limit(self) -> int:
        return int(self._budget * self._window_requests + self._reserve + _EPS)

    def __repr__(self) -> str:
        return (
            f"<RetryBudget retries={self._window_retries}/{self._limit()}"
            f" requests={self._window_requests} in {self._window:g}s budget={self._budget:g}"
            f" min_per_second={self._min_per_second:g} denied={self._denied}>"
        )
