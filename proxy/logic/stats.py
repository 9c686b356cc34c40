"""Request statistics kept by the data path in plain integers, read at scrape time."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Final

# Seconds; Prometheus' defaults stretched down to the sub-millisecond range a proxy lives in.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


# The label of every status code an upstream may answer (llhttp reads three digits), made once.
CODE_LABELS: Final = tuple(str(code) for code in range(1000))


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    buckets: tuple[tuple[float, int], ...]  # (upper bound, cumulative count), +Inf last
    count: int
    sum: float


class Histogram:
    """A fixed-bucket histogram: one bisect and two additions per observation."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> HistogramSnapshot:
        cumulative = 0
        buckets: list[tuple[float, int]] = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        return HistogramSnapshot(tuple(buckets), cumulative, self.sum)

    def __repr__(self) -> str:
        return f"<Histogram count={sum(self.counts)} sum={self.sum:.3f}>"


class PoolStats:
    """Per-pool counters the data path writes and the metrics module reads."""

    __slots__ = ("duration", "retries")

    def __init__(self) -> None:
        self.duration = Histogram()
        self.retries: dict[str, int] = {}

    def retried(self, reason: str) -> None:
        self.retries[reason] = self.retries.get(reason, 0) + 1

    def __repr__(self) -> str:
        return f"<PoolStats {self.duration!r} retries={self.retries}>"
