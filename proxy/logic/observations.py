"""What the data path saw, counted for the analysis, /status and /metrics.

The data path writes these counters (one dict or integer update per event); the rollout
controller, the admin API and the metrics read them. A supervisor's are the sums of its
workers' reports (proxy/procs/shared.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from proxy.logic.analysis import PoolWindow
from proxy.logic.routing import POOLS, PoolName
from proxy.logic.stats import Histogram, PoolStats

WINDOW_BUCKETS = 1200  # time buckets of an analysis window at most
ROLLBACK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)


class Observations:
    """Each pool's outcome window (the analysis) and request statistics, the answers no
    upstream gave (by pool asked for and status), the requests the stable pool rescued, the
    exchanges a timeout ended (by phase) and how long rollbacks took."""

    __slots__ = ("pool_stats", "rescued", "rollback_seconds", "timeouts", "unrouted", "windows")

    def __init__(self, step_interval: float, phases: Iterable[str]) -> None:
        # Three steps of history in quarter seconds; a long step gets coarser buckets rather
        # than a table that grows with it (an hour-long step would take hundreds of MB).
        span = max(60.0, 3 * step_interval)
        bucket = max(0.25, span / WINDOW_BUCKETS)
        self.windows: dict[PoolName, PoolWindow] = {
            p: PoolWindow(span=span, bucket=bucket) for p in POOLS
        }
        self.pool_stats: dict[PoolName, PoolStats] = {p: PoolStats() for p in POOLS}
        self.unrouted: dict[str, dict[int, int]] = {}
        self.rescued = 0
        self.timeouts: dict[str, int] = dict.fromkeys(phases, 0)
        self.rollback_seconds = Histogram(ROLLBACK_BUCKETS)

    def __repr__(self) -> str:
        return f"<Observations rescued={self.rescued} timeouts={sum(self.timeouts.values())}>"
