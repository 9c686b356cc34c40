"""Outcomes across a fleet: each member publishes what its analysis windows counted (per
pool: errors, latency bins) as running totals and as the increase since its previous report;
the leader adds them into its own windows, as a supervisor adds its workers' reports.

From a member it heard within `FRESH`, the leader adds the totals' increase over the last
report it took: a report etcd did not take (a put that timed out) loses nothing, the next one
carries its outcomes, and a report read twice adds nothing. Otherwise (its first report to
this leader, a member restarted, reports lost for longer) the leader adds only the report's
own increase, since older outcomes may belong to another step."""

from __future__ import annotations

import json
import logging
import secrets
from itertools import zip_longest
from typing import TYPE_CHECKING, Any

from proxy.logic.analysis import LATENCY_BINS
from proxy.logic.routing import POOLS, PoolName

if TYPE_CHECKING:
    from proxy.logic.analysis import WindowFigures
    from proxy.runtime import Proxy

log = logging.getLogger("turnout.fleet")

FRESH = 1.0  # seconds a report counts toward coverage, and may follow the previous one

# Per pool: its errors, then the count in each latency bin; all since the member started.
Totals = dict[PoolName, list[int]]


def _zero() -> list[int]:
    return [0] * (LATENCY_BINS + 1)


class OutcomeTap:
    """Keeps a member's totals from its windows; adds the others' increases when leading."""

    __slots__ = ("_anchor", "_heard", "_last", "_totals", "epoch", "proxy")

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        # Tells the leader that totals restarted from zero (a new process).
        self.epoch = secrets.token_hex(8)
        self._totals: Totals = {p: _zero() for p in POOLS}
        # Per member: its epoch, when it was last heard (wall clock) and its last totals.
        self._heard: dict[str, tuple[str, float, Totals]] = {}
        # Counting starts now: the first report carries what came since, a candidate failing
        # in the fleet's first moments too.
        self._anchor = 0.0
        self._last: dict[PoolName, WindowFigures] = {}
        self.restart()

    def restart(self) -> None:
        """Count only what comes from now on (a member that stops leading must not report
        the others' outcomes it merged); forget who reported."""
        now = self.proxy.clock()
        self._anchor = now
        self._last = {p: self.proxy.observed.windows[p].figures(now, since=now) for p in POOLS}
        self._heard = {}

    def take(self, *, counting: bool) -> bytes | None:
        """Add what the windows counted since the previous call to the totals (unless not
        `counting`: a leader's windows hold the others' outcomes too) and return the report,
        JSON; None when not counting."""
        proxy = self.proxy
        now = proxy.clock()
        increases: Totals = {}
        for name in POOLS:
            figures = proxy.observed.windows[name].figures(now, since=self._anchor)
            last = self._last[name]
            if not counting or figures.requests <= last.requests:
                continue
            increase = increases[name] = _zero()
            increase[0] = max(0, figures.errors - last.errors)
            pairs = zip_longest(figures.histogram, last.histogram, fillvalue=0)
            for i, (a, b) in enumerate(pairs, start=1):
                if a > b:
                    increase[i] = a - b
            total = self._totals[name]
            for i, n in enumerate(increase):
                total[i] += n
        self._anchor = now
        self._last = {p: proxy.observed.windows[p].figures(now, since=now) for p in POOLS}
        if not counting:
            return None
        report = {"epoch": self.epoch, "totals": _wire(self._totals), "last": _wire(increases)}
        return json.dumps(report, separators=(",", ":")).encode()

    def merge(self, member: str, raw: bytes, wall: float) -> None:
        """Add another member's increase since its previous report to this (leading)
        member's windows."""
        try:
            report = json.loads(raw)
            epoch = str(report["epoch"])
            totals = _parse(report["totals"])
            increases = _parse(report["last"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("fleet: unreadable outcomes from %s: %s", member, exc)
            return
        before = self._heard.get(member)
        self._heard[member] = (epoch, wall, totals)
        if before is not None and before[0] == epoch and wall - before[1] <= FRESH:
            increases = {}
            for name, total in totals.items():
                previous = before[2].get(name, _zero())
                increase = [a - b for a, b in zip(total, previous, strict=True)]
                if any(n < 0 for n in increase):
                    log.warning("fleet: outcomes from %s went backwards; not counted", member)
                    return
                increases[name] = increase
        proxy = self.proxy
        now = proxy.clock()
        candidate_failed = False
        for name, increase in increases.items():
            errors = increase[0]
            bins = {i: n for i, n in enumerate(increase[1:]) if n}
            if not bins:
                continue
            proxy.observed.windows[name].record_counts(now, errors, bins)
            if errors and name != proxy.stable:
                candidate_failed = True
        if candidate_failed:
            proxy.rollout.candidate_failed()

    def reporting(self, wall: float) -> set[str]:
        return {m for m, (_, at, _) in self._heard.items() if wall - at <= FRESH}

    def forget(self, member: str) -> None:
        self._heard.pop(member, None)

    def __repr__(self) -> str:
        return f"<OutcomeTap epoch={self.epoch} reporting={sorted(self._heard)}>"


def _wire(counts: Totals) -> dict[str, Any]:
    return {
        name: {"errors": c[0], "latency": {str(i - 1): n for i, n in enumerate(c) if i and n}}
        for name, c in counts.items()
    }


def _parse(raw: Any) -> Totals:
    """A report's counts: per known pool, errors then each latency bin's count."""
    totals: Totals = {}
    for name in POOLS:
        if name not in raw:
            continue
        pool = raw[name]
        total = _zero()
        total[0] = _count(pool["errors"])
        for key, value in pool["latency"].items():
            index = int(key)
            if not 0 <= index < LATENCY_BINS:
                raise ValueError(f"latency bin {index} out of range")
            total[index + 1] = _count(value)
        totals[name] = total
    return totals


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"not a count: {value!r}")
    return value
