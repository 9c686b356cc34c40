"""Rollout strategies as pure decision functions: no timers, no I/O, no prometheus.

The controller owns time and traffic; every tick it hands these functions what it knows and
applies the `Decision`. Shares are the candidate's share of new requests in percent: the split
itself when green is the candidate, 100 - split when blue is (after a promotion).

- `next_split(steps, index)`: the Flagger-like walk; index -1 is "before the first step".
- `decide_adaptive(...)`: breach at once on a failed error or latency test, whatever the step's
  age; otherwise hold the step for `interval` and `min_requests` candidate outcomes, report
  `insufficient_data` when the interval passed without them, hold while a figure is over a
  limit without conclusive evidence, then advance, or promote when the next share would be 100
  (or the current one is). The controller checks the gate before it acts on an advance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Literal, Protocol

from proxy.logic.analysis import ErrorTest, LatencyTest, WindowFigures

__all__ = [
    "STRATEGIES",
    "Decision",
    "StepState",
    "Strategy",
    "ThresholdLike",
    "Verdict",
    "analysed_steps",
    "decide_adaptive",
    "next_split",
]

FULL = 100.0

# How a rollout moves the traffic: all at once (eager), when the operator says (lazy), or step
# by step while the analysis passes (adaptive).
Strategy = Literal["eager", "lazy", "adaptive"]
STRATEGIES: Final[tuple[Strategy, ...]] = ("eager", "lazy", "adaptive")


class Verdict(StrEnum):
    """What the controller should do after one evaluation; a str, so `str(v)` is its value."""

    HOLD = "hold"
    ADVANCE = "advance"
    PROMOTE = "promote"
    BREACH = "breach"
    INSUFFICIENT_DATA = "insufficient_data"


class ThresholdLike(Protocol):
    """The `rollout.threshold` section (proxy.config.ThresholdConfig satisfies it)."""

    @property
    def max_error_rate(self) -> float: ...
    @property
    def max_p99(self) -> float: ...  # seconds
    @property
    def max_p99_ratio(self) -> float: ...
    @property
    def min_requests(self) -> int: ...


@dataclass(frozen=True, slots=True)
class StepState:
    """The step the rollout is on: its index in `steps`, when it began, the candidate share."""

    index: int
    started_at: float
    split: float


@dataclass(frozen=True, slots=True)
class Decision:
    """One verdict with the share to move to (ADVANCE/PROMOTE only), a reason and the figures.

    A BREACH carries no share: the controller applies `rollout.fallback` (rollback to 0 or
    pause at the current share).
    """

    verdict: Verdict
    next_split: float | None
    reason: str
    figures: dict[str, object]


def next_split(steps: Sequence[float], index: int) -> float | None:
    """The share after step `index` (-1: before the first step), or None after the last."""
    if index < -1:
        raise ValueError(f"step index must be >= -1, got {index}")
    following = index + 1
    return float(steps[following]) if following < len(steps) else None


def analysed_steps(steps: Sequence[float]) -> int:
    """How many steps of a rollout are analysed (those below 100): the `steps` of the tests."""
    return max(1, sum(1 for share in steps if share < FULL))


def _secs(seconds: float) -> str:
    return f"{seconds:.1f} s"


def decide_adaptive(
    *,
    now: float,
    step: StepState,
    steps: Sequence[float],
    interval: float,
    threshold: ThresholdLike,
    candidate: WindowFigures,
    stable: WindowFigures,
    error_test: ErrorTest,
    latency_test: LatencyTest | None = None,
) -> Decision:
    """One evaluation of an adaptive rollout; `candidate`/`stable` are read since the step began.

    Without `latency_test` one is built from `threshold` on `error_test`'s false-alarm budget.
    It is told the step's share, which its pooled test holds the candidate's slow outcomes to.
    """
    if latency_test is None:
        latency_test = LatencyTest(
            threshold.max_p99, threshold.max_p99_ratio, error_test.alpha, steps=error_test.steps
        )
    errors = error_test.verdict(candidate, stable)
    latency = latency_test.verdict(candidate, stable, step.split / FULL)
    elapsed = now - step.started_at
    figures: dict[str, object] = {
        "step": step.index + 1,
        "split": step.split,
        "elapsed": elapsed,
        "candidate": candidate.as_dict(),
        "stable": stable.as_dict(),
        "errors": errors.as_dict(),
        "latency": latency.as_dict(),
    }
    where = f"step {step.index + 1} ({step.split:g}%)"

    def decision(verdict: Verdict, reason: str, share: float | None = None) -> Decision:
        return Decision(verdict, share, reason, figures)

    if errors.outcome == "fail":
        return decision(Verdict.BREACH, errors.reason)
    if latency.outcome == "fail":
        return decision(Verdict.BREACH, latency.reason)
    if step.split >= FULL:
        return decision(Verdict.PROMOTE, f"{where} is the last: all traffic on the candidate", FULL)
    wanted = threshold.min_requests
    if elapsed < interval:
        return decision(
            Verdict.HOLD,
            f"holding {where}: {_secs(elapsed)} of {_secs(interval)}, "
            f"{candidate.requests} candidate outcomes ({wanted} needed)",
        )
    if candidate.requests < wanted:
        return decision(
            Verdict.INSUFFICIENT_DATA,
            f"insufficient data at {where}: {candidate.requests} candidate outcomes "
            f"({wanted} needed) after {_secs(elapsed)}",
        )
    for analysis in (errors, latency):
        if analysis.outcome == "undecided":
            return decision(Verdict.HOLD, f"holding {where}: {analysis.reason}")
    share = next_split(steps, step.index)
    passed = f"{errors.reason}; {latency.reason}"
    if share is None or share >= FULL:
        return decision(Verdict.PROMOTE, f"{where} passed: {passed}", FULL)
    return decision(Verdict.ADVANCE, f"{where} passed, advancing to {share:g}%: {passed}", share)
