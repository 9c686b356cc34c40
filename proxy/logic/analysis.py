"""Live analysis of request outcomes per pool: sliding windows and sequential tests.

Pure logic: no awaits, no sockets, no prometheus. The data path calls `PoolWindow.record` once
per upstream outcome; the rollout controller reads `PoolWindow.figures` every tick and asks
`ErrorTest` and `LatencyTest` whether the candidate pool is worse than the stable pool.

**Windows.** A `PoolWindow` is a ring of time buckets, each with an error count and a latency
histogram on a fixed log-spaced scale (`LATENCY_GROWTH` per bin from `LATENCY_MIN` to
`LATENCY_MAX`, `LATENCY_BINS` bins; the request count is the histogram's sum). Memory is fixed
at construction whatever the traffic: about 3.3 KB per bucket, 200 KB for a minute of 1 s
buckets. A
quantile read from a histogram is the nearest-rank quantile of the recorded latencies to within
a relative error of `QUANTILE_ERROR` = (g - 1) / (g + 1) = 1.96 % for latencies inside the
scale; latencies outside it are clamped to its ends.

**Sequential tests.** Every comparison is a mixture sequential probability ratio test (mSPRT) on
a binomial count: `x` "bad" events out of `n` trials, null success probability `p0`, against a
mixture of alternatives whose odds are `k` times the null odds, for 14 values of k from 1.25 to
4096 with equal weights. Under the null the mixture likelihood ratio is a non-negative
martingale starting at 1, so by Ville's inequality it ever reaches `1/a` with probability at
most `a`, however often it is looked at. That is what lets the controller check after every
outcome and still bound false alarms, and why a clearly broken candidate is caught after a
handful of its requests.

- *Errors against the stable pool* (conditional test of two Poisson rates): given `E` errors
  in both pools over the same window, the number from the candidate is binomial with
  probability `q0 = c / (c + s)` (odds `margin * c / s` in general) when the candidate's error
  rate is at most `margin` times the stable one's (`c`, `s`: request counts). Conditioning on
  the total makes the test immune to error bursts that hit both pools alike, and needs no
  estimate of the error rate itself. (The exact conditional law is hypergeometric; by
  Hoeffding's result on sampling without replacement its mean of a convex function, such as
  the likelihood ratio, is at most the binomial one, so the binomial errs toward fewer alarms.)
- *Errors against `max_error_rate`*: `x` candidate errors out of its `n` requests, `p0 =
  max_error_rate`.
- *Latency against the stable pool*: the candidate's p99 exceeds a limit `L` exactly when more
  than 1 % of its requests are slower than `L`; so `x` = candidate requests slower than `L`,
  `p0 = 0.01`, with `L = max(max_p99_ratio * stable p99, stable p99 + LATENCY_FLOOR)`. It
  fails only together with the *pooled test*: of the `S` outcomes of both pools slower than
  the same `L` over the same window, `x` are the candidate's, against `p0` = its traffic share
  (of the step, or `c / (c + s)` if larger). See "Clustered slowness" for why.
- *Latency against `max_p99`*: the same with `L = max_p99`.

A test *fails* (a breach) only when the point estimate is over the limit and the likelihood
ratio passed `1/a`. When the estimate is over the limit but the evidence is not yet conclusive
the verdict is *undecided*: the rollout holds its step and keeps counting, it neither advances
nor rolls back on noise.

**Clustered slowness.** The binomial tests assume independent outcomes. Slowness of the machine
is not: a stall of the event loop, a GC pause or a descheduled process delays every request in
flight at that moment, of both pools, so slow outcomes come in bursts. Where both pools take
the step's traffic a stall lifts the stable p99, and so the limit, along with the candidate's;
but the stable pool's window can also hold calm outcomes its stalled ones are lost among: those
from before the step at a smaller candidate share (the window's first bucket), and nothing else
at a step to 100 %. The 1 % tail test alone then counts one stall as many independent pieces of
evidence and false-alarms far above `a` (seen: three stalls just after the step to 100 %
delayed 35 of the candidate's 358 requests; tests/test_analysis.py replays such steps). The
pooled test needs no model of the stalls, their length, number or timing: the router does not
look at latency, so for a candidate as good as the stable pool every slow outcome of the step
is the candidate's with probability at most the step's share, whatever made it slow and
whichever other outcomes were slow with it; the mixture ratio over the sequence of slow
outcomes is a supermartingale and Ville's bound `a` holds (with the limit read from the stable
pool's own figures, as for the other tests; the split spreader is more even than the
independent draws the bound assumes, which if anything makes alarms rarer). Hence the step's
share as the null, not the window's mix; at a 100 % step no stable traffic shares the step and
the pooled test can never fail. The relative latency check breaches only on evidence against
both nulls, each at `a`: its false-alarm rate stays at most `a` for a candidate as good as the
stable pool under stalls, and for one worse than it but within `max_p99_ratio` with independent
outcomes, so the designed `alpha` below holds. A p99 over `L` whose part of the slow outcomes
is within its share is slowness shared with the stable pool: it passes rather than holds the
step. De-clustering the evidence (one piece per time slot) or asking for more of it would need
a guess of a stall's length and still take slots as independent; the pooled test needs neither,
and reads only the histograms the windows keep anyway. The absolute `max_p99` test keeps the
1 % tail alone: a limit the operator set holds whatever the stable pool does.

**False-alarm budget.** `alpha` is the designed probability that one rollout of a candidate
as good as the stable pool (and within the absolute limits) ends in a rollback. It is split
evenly over the `steps` analysed steps of the rollout and over the four tests above, so each
test runs at `a = alpha / (4 * steps)`: with the defaults (alpha 1 %, four analysed steps in
1, 5, 25, 50, 100) every test needs a likelihood ratio of 1600. The union bound makes this
conservative: Ville's bound is reached only by an endless sequence, and the measured rates are
far below it (tests/test_analysis.py and tests/test_strategy.py print them). The figures of one
step should be read from the step's start (`figures(now, since=step_start)`), so that every
step is a fresh test at a fixed split; a window shorter than a step forgets outcomes, so keep
`span` well above the rollout interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from sys import getsizeof
from typing import Final, Literal

__all__ = [
    "LATENCY_BINS",
    "LATENCY_FLOOR",
    "LATENCY_GROWTH",
    "LATENCY_MAX",
    "LATENCY_MIN",
    "LATENCY_MIN_REQUESTS",
    "QUANTILE_ERROR",
    "STABLE_MIN_REQUESTS",
    "ErrorTest",
    "ErrorVerdict",
    "Judgement",
    "LatencyTest",
    "LatencyVerdict",
    "PoolWindow",
    "WindowFigures",
    "latency_bin",
    "mixture_log_lr",
]

LATENCY_MIN: Final = 1e-5  # seconds; faster outcomes count as this
LATENCY_MAX: Final = 100.0  # seconds; slower outcomes count as this
LATENCY_GROWTH: Final = 1.04  # ratio of neighbouring bin edges
QUANTILE_ERROR = (LATENCY_GROWTH - 1) / (LATENCY_GROWTH + 1)
_LOG_MIN: Final = math.log(LATENCY_MIN)
_LOG_GROWTH: Final = math.log(LATENCY_GROWTH)
_INV_LOG_GROWTH: Final = 1.0 / _LOG_GROWTH
LATENCY_BINS: Final = math.ceil(math.log(LATENCY_MAX / LATENCY_MIN) / _LOG_GROWTH)
_log: Final = math.log
_BIN_OFFSET: Final = _LOG_MIN * _INV_LOG_GROWTH
_ZERO_ROW: Final = (0,) * (LATENCY_BINS + 1)
# A bin's representative value is within QUANTILE_ERROR of anything that falls into it.
_VALUES = tuple(
    LATENCY_MIN * LATENCY_GROWTH**i * 2 * LATENCY_GROWTH / (1 + LATENCY_GROWTH)
    for i in range(LATENCY_BINS)
)

LATENCY_MIN_REQUESTS = 20  # candidate outcomes before its latency is judged at all
STABLE_MIN_REQUESTS = 100  # stable outcomes before its p99 is a yardstick for the candidate
LATENCY_FLOOR = 0.005  # seconds the candidate p99 must exceed the stable one by, besides the ratio
_TAIL = 0.01  # share of requests above the p99

# What a test says of the candidate (not an upstream attempt's outcome: http/exchange.py).
Judgement = Literal["pass", "undecided", "fail"]


def _first_bin_at_or_above(seconds: float) -> int:
    """Index of the first bin whose every value is >= `seconds`."""
    if seconds <= LATENCY_MIN:
        return 0
    index = math.ceil((math.log(seconds) - _LOG_MIN) * _INV_LOG_GROWTH)
    # Float rounding can land one bin low; the bound must be conservative.
    while index < LATENCY_BINS and LATENCY_MIN * LATENCY_GROWTH**index < seconds:
        index += 1
    return min(index, LATENCY_BINS)


def latency_bin(latency: float) -> int:
    """Index of the bin `PoolWindow.record` counts an outcome of `latency` seconds in."""
    if latency > LATENCY_MIN:
        index = int(_log(latency) * _INV_LOG_GROWTH - _BIN_OFFSET)
        return index if index < LATENCY_BINS else LATENCY_BINS - 1
    return 0


def _quantile(histogram: Sequence[int], total: int, percent: int) -> float | None:
    """Nearest-rank quantile (the ceil(n * percent / 100)-th smallest value) from a histogram."""
    if total <= 0 or not histogram:
        return None
    rank = max(1, -(-total * percent // 100))
    seen = 0
    for index, count in enumerate(histogram):
        seen += count
        if seen >= rank:
            return _VALUES[index]
    return _VALUES[len(histogram) - 1]


@dataclass(frozen=True, slots=True)
class WindowFigures:
    """Outcomes of one pool over a window: counts, error rate, p50/p99 in seconds."""

    requests: int
    errors: int
    error_rate: float
    p50: float | None
    p99: float | None
    # Merged latency histogram on the module's scale (empty when built from counts alone).
    histogram: tuple[int, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def of(cls, requests: int, errors: int, histogram: Sequence[int] = ()) -> WindowFigures:
        """Figures from counts and an optional histogram (quantiles come from the histogram)."""
        hist = tuple(histogram)
        total = sum(hist)
        return cls(
            requests=requests,
            errors=errors,
            error_rate=errors / requests if requests else 0.0,
            p50=_quantile(hist, total, 50),
            p99=_quantile(hist, total, 99),
            histogram=hist,
        )

    @classmethod
    def merge(cls, parts: Iterable[WindowFigures]) -> WindowFigures:
        """Sum of several windows' figures (e.g. one per worker process)."""
        parts = list(parts)
        hists = [p.histogram for p in parts if p.histogram]
        merged = [sum(column) for column in zip(*hists, strict=True)] if hists else []
        return cls.of(sum(p.requests for p in parts), sum(p.errors for p in parts), merged)

    def count_at_or_above(self, seconds: float) -> int:
        """Outcomes whose latency bin lies wholly at or above `seconds` (a lower bound)."""
        first = _first_bin_at_or_above(seconds)  # bound first: see AccessLog._send
        return sum(self.histogram[first:])

    def as_dict(self) -> dict[str, object]:
        """JSON-ready figures for events and /status."""
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "p50": self.p50,
            "p99": self.p99,
        }

    def describe(self) -> str:
        """`1.0% over 1234`, for reasons."""
        return f"{self.error_rate:.1%} over {self.requests}"


class PoolWindow:
    """Sliding time window of one pool's outcomes in constant memory: a ring of time buckets."""

    __slots__ = ("_bucket", "_last_tick", "_per_second", "_rows", "_slots", "_ticks")

    def __init__(self, span: float, bucket: float = 1.0) -> None:
        if not (bucket > 0 and span >= bucket):
            raise ValueError(f"need span >= bucket > 0, got span={span} bucket={bucket}")
        self._bucket = bucket
        self._per_second = 1.0 / bucket
        # The current (partial) bucket plus enough whole ones to cover `span`.
        self._slots = math.ceil(span / bucket - 1e-9) + 1
        self._ticks = [-1] * self._slots
        # One row per bucket: the latency histogram, then the error count. A bucket's request
        # count is the sum of its histogram, as every outcome has a latency.
        self._rows = [[0] * (LATENCY_BINS + 1) for _ in range(self._slots)]
        self._last_tick = -1

    @property
    def span(self) -> float:
        """Seconds of history always covered (the ring holds one partial bucket more)."""
        return (self._slots - 1) * self._bucket

    @property
    def buckets(self) -> int:
        return self._slots

    def record(self, now: float, error: bool, latency: float) -> None:
        """Count one upstream outcome (hot path: O(1), no allocation of containers)."""
        tick = int(now * self._per_second)
        slot = tick % self._slots
        if self._ticks[slot] != tick:
            if self._ticks[slot] > tick:
                return  # older than the window
            self._recycle(slot, tick)
        row = self._rows[slot]
        if error:
            row[LATENCY_BINS] += 1
        if latency > LATENCY_MIN:
            index = int(_log(latency) * _INV_LOG_GROWTH - _BIN_OFFSET)
            row[index if index < LATENCY_BINS else LATENCY_BINS - 1] += 1
        else:
            row[0] += 1

    def record_counts(self, now: float, errors: int, bins: Mapping[int, int]) -> None:
        """Count outcomes recorded elsewhere (another process) at `now`: `bins` maps a
        `latency_bin` index to its count; the request count is their sum."""
        tick = int(now * self._per_second)
        slot = tick % self._slots
        if self._ticks[slot] != tick:
            if self._ticks[slot] > tick:
                return  # older than the window
            self._recycle(slot, tick)
        row = self._rows[slot]
        row[LATENCY_BINS] += errors
        for index, count in bins.items():
            row[min(max(index, 0), LATENCY_BINS - 1)] += count

    def _recycle(self, slot: int, tick: int) -> None:
        # Once per bucket per slot, so amortised O(1) per record; zeroes the row in place.
        self._ticks[slot] = tick
        self._rows[slot][:] = _ZERO_ROW
        if tick > self._last_tick:
            self._last_tick = tick

    def _merged(self, low_tick: int) -> list[int]:
        rows = [self._rows[i] for i, tick in enumerate(self._ticks) if tick >= low_tick]
        if len(rows) == 1:
            return rows[0]
        return [sum(column) for column in zip(*rows, strict=True)] if rows else []

    def figures(self, now: float, since: float | None = None) -> WindowFigures:
        """Figures over the buckets from the one holding `since` (clamped to the window) to now."""
        now_tick = int(now * self._per_second)
        low = now_tick - self._slots + 1
        if since is not None:
            low = min(max(low, int(since * self._per_second)), now_tick)
        merged = self._merged(low)
        if not merged:
            return WindowFigures.of(0, 0)
        return WindowFigures.of(
            sum(merged[:LATENCY_BINS]), merged[LATENCY_BINS], merged[:LATENCY_BINS]
        )

    def snapshot(self, now: float) -> WindowFigures:
        """The whole window's figures."""
        return self.figures(now)

    def reset(self) -> None:
        """Forget every outcome (e.g. at the start of a rollout)."""
        for slot in range(self._slots):
            self._recycle(slot, -1)
        self._last_tick = -1

    def footprint(self) -> int:
        """Bytes held by the window's containers; fixed at construction."""
        return sum(getsizeof(x) for x in (self._ticks, self._rows, *self._rows))

    def __repr__(self) -> str:
        merged = self._merged(self._last_tick - self._slots + 1)
        requests = sum(merged[:LATENCY_BINS])
        errors = merged[LATENCY_BINS] if merged else 0
        return (
            f"<PoolWindow span={self.span:g}s bucket={self._bucket:g}s "
            f"requests={requests} errors={errors}>"
        )


# Alternatives of the mixture: odds k times the null odds, equal weights. Dense near 1 for
# power against modest excesses, up to 4096 so a candidate failing everything at a share as
# small as 0.1 % gains nearly the full log(1/share) per error.
_ODDS_RATIOS = (1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0)
_LOG_ODDS_RATIOS = tuple(math.log(k) for k in _ODDS_RATIOS)
_LOG_WEIGHT = -math.log(len(_ODDS_RATIOS))


def mixture_log_lr(bad: int, trials: int, p0: float) -> float:
    """Log of the mixture likelihood ratio of `bad` events in `trials` against probability p0.

    Each alternative has odds k * p0 / (1 - p0); its likelihood ratio is
    k**bad / (1 + (k - 1) * p0)**trials. The result is 0.0 (ratio 1) when nothing can be said.
    """
    if trials <= 0 or p0 >= 1.0:
        return 0.0
    if p0 <= 0.0:
        return math.inf if bad > 0 else 0.0
    terms = [
        bad * log_k - trials * math.log1p((k - 1.0) * p0)
        for k, log_k in zip(_ODDS_RATIOS, _LOG_ODDS_RATIOS, strict=True)
    ]
    top = max(terms)
    return _LOG_WEIGHT + top + math.log(sum(math.exp(t - top) for t in terms))


def _ratio_text(log_lr: float) -> str:
    return f"{math.exp(log_lr):.1e}" if log_lr < 700 else f"e^{log_lr:.0f}"


def _budget(alpha: float, steps: int) -> float:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return alpha / (4 * steps)


@dataclass(frozen=True, slots=True)
class ErrorVerdict:
    """The error analysis of the candidate pool against the stable pool and the absolute limit."""

    outcome: Judgement
    reason: str
    relative_log_lr: float  # natural log of the likelihood ratio against the stable pool
    absolute_log_lr: float  # natural log of the likelihood ratio against max_error_rate
    candidate: WindowFigures
    stable: WindowFigures

    def as_dict(self) -> dict[str, object]:
        return {
            "outcome": self.outcome,
            "relative_lr": math.exp(min(self.relative_log_lr, 700.0)),
            "absolute_lr": math.exp(min(self.absolute_log_lr, 700.0)),
        }


class ErrorTest:
    """Sequential test of the candidate's errors against the stable pool's and max_error_rate.

    Fails when the candidate's error rate is, with evidence `1/a`, above `margin` times the
    stable pool's over the same window or above `max_error_rate` (module docstring: method and
    the budget `a = alpha / (4 * steps)`). Stateless: every verdict reads only its figures.
    """

    __slots__ = ("_log_bar", "alpha", "margin", "max_error_rate", "steps", "test_alpha")

    def __init__(
        self, max_error_rate: float, alpha: float = 0.01, *, steps: int = 4, margin: float = 1.0
    ) -> None:
        if not 0.0 <= max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be in [0, 1], got {max_error_rate}")
        if margin < 1.0:
            raise ValueError(f"margin must be >= 1, got {margin}")
        self.max_error_rate = max_error_rate
        self.alpha = alpha
        self.steps = steps
        self.margin = margin
        self.test_alpha = _budget(alpha, steps)
        self._log_bar = -math.log(self.test_alpha)

    def verdict(self, candidate: WindowFigures, stable: WindowFigures) -> ErrorVerdict:
        """ "fail" on conclusive evidence, "undecided" while the candidate's rate is over
        max_error_rate without it, else "pass"."""
        if candidate.requests and stable.requests:
            odds = self.margin * candidate.requests / stable.requests
            relative = mixture_log_lr(
                candidate.errors, candidate.errors + stable.errors, odds / (1 + odds)
            )
        else:
            relative = 0.0
        absolute = mixture_log_lr(candidate.errors, candidate.requests, self.max_error_rate)
        bar = f"1/alpha = {1 / self.test_alpha:.0f}"
        versus = (
            f"candidate error rate {candidate.describe()} requests vs stable {stable.describe()}"
        )
        worse = candidate.error_rate > self.margin * stable.error_rate
        if relative >= self._log_bar and worse:
            outcome: Judgement = "fail"
            reason = f"{versus} (sequential test, likelihood ratio {_ratio_text(relative)} > {bar})"
        elif absolute >= self._log_bar and candidate.error_rate > self.max_error_rate:
            outcome = "fail"
            reason = (
                f"candidate error rate {candidate.describe()} requests above max "
                f"{self.max_error_rate:.1%} (sequential test, likelihood ratio "
                f"{_ratio_text(absolute)} > {bar})"
            )
        elif candidate.error_rate > self.max_error_rate:
            outcome = "undecided"
            reason = (
                f"candidate error rate {candidate.describe()} requests above max "
                f"{self.max_error_rate:.1%}, not yet conclusive (likelihood ratio "
                f"{_ratio_text(absolute)} < {bar})"
            )
        else:
            outcome = "pass"
            reason = f"{versus} (likelihood ratio {_ratio_text(relative)})"
        return ErrorVerdict(outcome, reason, relative, absolute, candidate, stable)

    def __repr__(self) -> str:
        return (
            f"<ErrorTest max_error_rate={self.max_error_rate:g} alpha={self.alpha:g} "
            f"steps={self.steps} margin={self.margin:g} per-test alpha={self.test_alpha:.3g}>"
        )


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


@dataclass(frozen=True, slots=True)
class LatencyVerdict:
    """The latency analysis of the candidate pool against the stable pool and max_p99."""

    outcome: Judgement
    reason: str
    relative_log_lr: float  # natural log of the likelihood ratio against the stable pool
    absolute_log_lr: float  # natural log of the likelihood ratio against max_p99
    limit: float | None  # the p99 the stable pool allows the candidate, None when not judged
    candidate: WindowFigures
    stable: WindowFigures
    # Natural log of the likelihood ratio of the candidate's part of both pools' outcomes
    # above `limit` against its traffic share (the pooled test, module docstring).
    pooled_log_lr: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "outcome": self.outcome,
            "relative_lr": math.exp(min(self.relative_log_lr, 700.0)),
            "pooled_lr": math.exp(min(self.pooled_log_lr, 700.0)),
            "absolute_lr": math.exp(min(self.absolute_log_lr, 700.0)),
            "limit": self.limit,
        }


class LatencyTest:
    """Sequential test of the candidate's p99 against max_p99 and max_p99_ratio x stable p99.

    Counts the candidate requests slower than the limit; its p99 is over the limit exactly when
    more than 1 % are. Judged from LATENCY_MIN_REQUESTS candidate outcomes on; the comparison
    with the stable pool needs STABLE_MIN_REQUESTS stable outcomes, and a limit at least
    LATENCY_FLOOR above the stable p99 so that sub-millisecond jitter is never a breach. Above
    that limit the candidate must also be slow more often than the stable pool over the same
    window (the pooled test), so that a stall of the whole process, which makes requests of
    both pools slow at once, is not blamed on the candidate. Shares the rollout's false-alarm
    budget with `ErrorTest` (module docstring).
    """

    __slots__ = ("_log_bar", "alpha", "max_p99", "max_p99_ratio", "steps", "test_alpha")

    def __init__(
        self, max_p99: float, max_p99_ratio: float, alpha: float = 0.01, *, steps: int = 4
    ) -> None:
        if max_p99 <= 0 or max_p99_ratio < 1:
            raise ValueError(
                f"need max_p99 > 0 and max_p99_ratio >= 1, got {max_p99}, {max_p99_ratio}"
            )
        self.max_p99 = max_p99
        self.max_p99_ratio = max_p99_ratio
        self.alpha = alpha
        self.steps = steps
        self.test_alpha = _budget(alpha, steps)
        self._log_bar = -math.log(self.test_alpha)

    def limit(self, stable: WindowFigures) -> float | None:
        """The p99 the stable pool allows the candidate, or None while it has too few outcomes."""
        if stable.p99 is None or stable.requests < STABLE_MIN_REQUESTS:
            return None
        return max(self.max_p99_ratio * stable.p99, stable.p99 + LATENCY_FLOOR)

    def verdict(
        self, candidate: WindowFigures, stable: WindowFigures, share: float | None = None
    ) -> LatencyVerdict:
        """ "fail" on conclusive evidence, "undecided" while the candidate's p99 is over a limit
        without it, else "pass". `share`: the candidate's share of new requests (0 to 1) when
        the caller knows it; the pooled test's null share is at least that (module docstring)."""
        limit = self.limit(stable)
        total = sum(candidate.histogram)
        p99 = candidate.p99
        if total < LATENCY_MIN_REQUESTS or p99 is None:
            reason = f"latency not judged: {total} < {LATENCY_MIN_REQUESTS} candidate outcomes"
            return LatencyVerdict("pass", reason, 0.0, 0.0, limit, candidate, stable)
        bar = f"1/alpha = {1 / self.test_alpha:.0f}"
        absolute = mixture_log_lr(candidate.count_at_or_above(self.max_p99), total, _TAIL)
        mine = f"candidate p99 {_ms(p99)} over {total} requests"
        # (over the limit, conclusive, the limit, the evidence)
        checks = [
            (
                p99 > self.max_p99,
                absolute >= self._log_bar,
                f"max_p99 {_ms(self.max_p99)}",
                f"likelihood ratio {_ratio_text(absolute)}",
            )
        ]
        relative = pooled = 0.0
        theirs = tails = ""
        if limit is not None:
            slow = candidate.count_at_or_above(limit)
            slow_both = slow + stable.count_at_or_above(limit)
            # The window's first bucket may hold outcomes from before the step, at a smaller
            # share; the step's share is what a stall in the step splits its victims by.
            traffic = max(total / (total + sum(stable.histogram)), share or 0.0)
            relative = mixture_log_lr(slow, total, _TAIL)
            pooled = mixture_log_lr(slow, slow_both, traffic)
            theirs = (
                f"{self.max_p99_ratio:g} x stable p99 {_ms(stable.p99)} over {stable.requests}"
                f" (limit {_ms(limit)})"
            )
            tails = (
                f"{slow} of the {slow_both} outcomes above the limit are the candidate's, "
                f"its traffic share {traffic:.1%}"
            )
            # Over the limit but no more often than the stable pool: slowness they share.
            shared = slow_both > 0 and slow <= traffic * slow_both
            checks.append(
                (
                    p99 > limit and not shared,
                    relative >= self._log_bar and pooled >= self._log_bar,
                    f"{theirs}; {tails}",
                    f"likelihood ratios {_ratio_text(relative)} against a 1% tail and "
                    f"{_ratio_text(pooled)} against the traffic share",
                )
            )

        def answer(outcome: Judgement, reason: str) -> LatencyVerdict:
            return LatencyVerdict(
                outcome, reason, relative, absolute, limit, candidate, stable, pooled
            )

        for over, conclusive, what, evidence in checks:
            if over and conclusive:
                return answer("fail", f"{mine} > {what} (sequential test, {evidence} > {bar})")
        for over, _, what, evidence in checks:
            if over:
                reason = f"{mine} > {what}, not yet conclusive ({evidence}; {bar} needed)"
                return answer("undecided", reason)
        within = f"{mine} within max_p99 {_ms(self.max_p99)}"
        if limit is None:
            reason = (
                f"{within}; not compared with stable "
                f"({stable.requests} < {STABLE_MIN_REQUESTS} outcomes)"
            )
        elif p99 > limit:
            reason = f"{within}; over {theirs}, but no more often than the stable pool: {tails}"
        else:
            reason = f"{within} and {theirs}"
        return answer("pass", reason)

    def __repr__(self) -> str:
        return (
            f"<LatencyTest max_p99={self.max_p99:g}s max_p99_ratio={self.max_p99_ratio:g} "
            f"alpha={self.alpha:g} steps={self.steps} per-test alpha={self.test_alpha:.3g}>"
        )
