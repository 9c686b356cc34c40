"""Outcomes across a fleet: each member publishes what its analysis windows counted since its
last report (per pool: requests, errors, latency bins); the leader adds the others' reports
into its own windows, as a supervisor adds its workers' reports."""

from __future__ import annotations

import json
import logging
from itertools import zip_longest
from typing import TYPE_CHECKING, Any

from proxy.logic.analysis import WindowFigures
from proxy.logic.routing import POOLS

if TYPE_CHECKING:
    from proxy.runtime import Proxy

log = logging.getLogger("turnout.fleet")

FRESH = 1.0  # seconds a report counts toward coverage


class OutcomeTap:
    """Reads a member's windows for what is new since the last report; merges the others'."""

    __slots__ = ("_anchor", "_last", "_seen", "proxy")

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self._anchor: float | None = None
        self._last: dict[str, WindowFigures] = {}
        self._seen: dict[str, float] = {}

    def restart(self) -> None:
        """Report only what comes from now on (a member that stops leading must not report
        the others' outcomes it merged); forget who reported."""
        now = self.proxy.clock()
        self._anchor = now
        self._last = {p: self.proxy.observed.windows[p].figures(now, since=now) for p in POOLS}
        self._seen = {}

    def take(self) -> bytes | None:
        """The report since the previous one, JSON; None right after a restart."""
        if self._anchor is None:
            self.restart()
            return None
        proxy = self.proxy
        now = proxy.clock()
        pools: dict[str, Any] = {}
        for name in POOLS:
            window = proxy.observed.windows[name]
            figures = window.figures(now, since=self._anchor)
            last = self._last[name]
            requests = figures.requests - last.requests
            if requests <= 0:
                continue
            bins = {
                str(i): a - b
                for i, (a, b) in enumerate(
                    zip_longest(figures.histogram, last.histogram, fillvalue=0)
                )
                if a > b
            }
            pools[name] = {
                "requests": requests,
                "errors": max(0, figures.errors - last.errors),
                "latency": bins,
            }
        self._anchor = now
        self._last = {p: proxy.observed.windows[p].figures(now, since=now) for p in POOLS}
        return json.dumps({"pools": pools}, separators=(",", ":")).encode()

    def merge(self, member: str, raw: bytes, wall: float) -> None:
        """Add another member's report to this (leading) member's windows."""
        proxy = self.proxy
        try:
            pools = json.loads(raw)["pools"]
            parsed = [
                (
                    name,
                    int(pools[name]["errors"]),
                    {int(k): int(v) for k, v in pools[name]["latency"].items()},
                )
                for name in POOLS
                if name in pools
            ]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("fleet: unreadable outcomes from %s: %s", member, exc)
            return
        self._seen[member] = wall
        now = proxy.clock()
        candidate_failed = False
        for name, errors, bins in parsed:
            proxy.observed.windows[name].record_counts(now, errors, bins)
            if errors and name != proxy.stable:
                candidate_failed = True
        if candidate_failed:
            proxy.rollout.candidate_failed()

    def reporting(self, wall: float) -> set[str]:
        return {m for m, at in self._seen.items() if wall - at <= FRESH}

    def forget(self, member: str) -> None:
        self._seen.pop(member, None)

    def __repr__(self) -> str:
        return f"<OutcomeTap reporting={sorted(self._seen)}>"
