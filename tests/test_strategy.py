"""Strategies: every verdict of decide_adaptive, and whole simulated rollouts on a fake clock."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from proxy.config import ThresholdConfig
from proxy.logic.analysis import ErrorTest, LatencyTest, PoolWindow, WindowFigures
from proxy.logic.strategy import (
    Decision,
    StepState,
    Verdict,
    analysed_steps,
    decide_adaptive,
    next_split,
)

STEPS = (1.0, 5.0, 25.0, 50.0, 100.0)
THRESHOLD = ThresholdConfig()  # max_error_rate 1 %, max_p99 500 ms, ratio 1.5, min_requests 50


def figures(latencies: Sequence[float], errors: int = 0) -> WindowFigures:
    window = PoolWindow(span=10)
    for i, latency in enumerate(latencies):
        window.record(0.0, i < errors, latency)
    return window.figures(0.0)


GOOD = figures([0.02] * 200)
STABLE = figures([0.02] * 5000)


def decide(
    *,
    elapsed: float = 11.0,
    index: int = 0,
    candidate: WindowFigures = GOOD,
    stable: WindowFigures = STABLE,
    steps: Sequence[float] = STEPS,
    latency_test: LatencyTest | None = None,
) -> Decision:
    return decide_adaptive(
        now=100.0 + elapsed,
        step=StepState(index=index, started_at=100.0, split=steps[index]),
        steps=steps,
        interval=10.0,
        threshold=THRESHOLD,
        candidate=candidate,
        stable=stable,
        error_test=ErrorTest(THRESHOLD.max_error_rate, steps=analysed_steps(steps)),
        latency_test=latency_test,
    )


# --- next_split ---------------------------------------------------------------------------


def test_next_split_walks_the_steps() -> None:
    assert [next_split(STEPS, i) for i in range(-1, 5)] == [1, 5, 25, 50, 100, None]
    assert next_split([100], -1) == 100.0
    assert next_split([100], 0) is None
    with pytest.raises(ValueError, match="step index must be"):
        next_split(STEPS, -2)


def test_analysed_steps_are_those_below_100() -> None:
    assert analysed_steps(STEPS) == 4
    assert analysed_steps([100]) == 1
    assert analysed_steps([10, 20, 30, 40, 50, 60, 70, 80, 90, 100]) == 9


# --- decide_adaptive, one verdict at a time -----------------------------------------------


def test_hold_while_the_interval_runs() -> None:
    got = decide(elapsed=3.0)
    assert got.verdict is Verdict.HOLD
    assert got.next_split is None
    assert got.reason == "holding step 1 (1%): 3.0 s of 10.0 s, 200 candidate outcomes (50 needed)"


def test_advance_when_interval_and_min_requests_are_met() -> None:
    got = decide()
    assert got.verdict is Verdict.ADVANCE
    assert got.next_split == 5.0
    assert got.reason.startswith("step 1 (1%) passed, advancing to 5%: candidate error rate 0.0%")
    assert got.figures["step"] == 1
    assert got.figures["split"] == 1.0
    assert got.figures["elapsed"] == pytest.approx(11.0)
    assert got.figures["candidate"] == GOOD.as_dict()
    assert got.figures["stable"] == STABLE.as_dict()
    assert set(got.figures) == {
        "step",
        "split",
        "elapsed",
        "candidate",
        "stable",
        "errors",
        "latency",
    }


def test_insufficient_data_is_explicit() -> None:
    got = decide(candidate=figures([0.02] * 49))
    assert got.verdict is Verdict.INSUFFICIENT_DATA
    assert got.next_split is None
    assert (
        got.reason
        == "insufficient data at step 1 (1%): 49 candidate outcomes (50 needed) after 11.0 s"
    )
    assert decide(candidate=figures([0.02] * 50)).verdict is Verdict.ADVANCE


def test_promote_when_the_next_share_is_100() -> None:
    got = decide(index=3)
    assert got.verdict is Verdict.PROMOTE
    assert got.next_split == 100.0
    assert got.reason.startswith("step 4 (50%) passed:")


def test_promote_at_a_last_step_of_100() -> None:
    got = decide(index=4, elapsed=0.5, candidate=figures([0.02] * 5), stable=figures([]))
    assert got.verdict is Verdict.PROMOTE
    assert got.next_split == 100.0
    assert got.reason == "step 5 (100%) is the last: all traffic on the candidate"


def test_breach_on_errors_at_once() -> None:
    got = decide(elapsed=0.1, candidate=figures([0.001] * 14, errors=14))
    assert got.verdict is Verdict.BREACH
    assert got.next_split is None
    assert got.reason.startswith(
        "candidate error rate 100.0% over 14 requests vs stable 0.0% over 5000"
    )
    assert "sequential test, likelihood ratio" in got.reason
    assert got.figures["errors"]["outcome"] == "fail"  # type: ignore[index]
    # Even at the last step: a breach is never promoted.
    assert decide(index=4, candidate=figures([0.001] * 14, errors=14)).verdict is Verdict.BREACH


def test_breach_on_three_times_slower_p99() -> None:
    rng = random.Random(1)
    stable = figures([rng.lognormvariate(math.log(0.02), 0.5) for _ in range(5000)])
    candidate = figures([3 * rng.lognormvariate(math.log(0.02), 0.5) for _ in range(200)])
    got = decide(elapsed=2.0, candidate=candidate, stable=stable)
    assert got.verdict is Verdict.BREACH
    assert "> 1.5 x stable p99" in got.reason
    assert got.figures["latency"]["outcome"] == "fail"  # type: ignore[index]


def test_a_stall_at_the_full_step_is_not_a_breach() -> None:
    # Stalls of a loaded machine delayed the candidate's requests just after the step to 100 %
    # began, while the stable pool's window held only calm outcomes from before the step: the
    # latency test is told the step's share, and no stable traffic shares the step.
    candidate = figures([0.003] * 323 + [0.013] * 35)
    got = decide(index=4, elapsed=0.1, candidate=candidate, stable=figures([0.003] * 179))
    assert got.verdict is Verdict.PROMOTE, got.reason
    assert got.figures["latency"]["outcome"] == "pass"  # type: ignore[index]
    assert got.figures["latency"]["relative_lr"] > 1e15  # type: ignore[index]


def test_breach_on_absolute_p99() -> None:
    got = decide(elapsed=2.0, candidate=figures([0.7] * 30), stable=figures([0.6] * 3000))
    assert got.verdict is Verdict.BREACH
    assert "> max_p99 500.0 ms" in got.reason


def test_undecided_errors_hold_the_step() -> None:
    got = decide(candidate=figures([0.02] * 50, errors=1), stable=figures([0.02] * 5000, errors=40))
    assert got.verdict is Verdict.HOLD
    assert got.reason.startswith("holding step 1 (1%): candidate error rate 2.0% over 50 requests")
    assert "not yet conclusive" in got.reason


def test_undecided_latency_holds_the_step() -> None:
    got = decide(candidate=figures([0.02] * 98 + [0.9] * 2))
    assert got.verdict is Verdict.HOLD
    assert "> max_p99 500.0 ms, not yet conclusive" in got.reason


def test_sub_millisecond_jitter_is_not_a_breach() -> None:
    got = decide(candidate=figures([0.0012] * 200), stable=figures([0.0004] * 5000))
    assert got.verdict is Verdict.ADVANCE  # three times slower, but by 0.8 ms


def test_explicit_latency_test_is_used() -> None:
    strict = LatencyTest(max_p99=0.01, max_p99_ratio=1.5)
    assert decide(elapsed=1.0, latency_test=strict).verdict is Verdict.BREACH


def test_verdicts_are_strings() -> None:
    assert [str(v) for v in Verdict] == [
        "hold",
        "advance",
        "promote",
        "breach",
        "insufficient_data",
    ]


# --- whole rollouts: fake clock, deterministic split, seeded outcomes ----------------------


@dataclass(frozen=True)
class Pool:
    error_rate: float = 0.0
    median: float = 0.02  # seconds, lognormal latency
    sigma: float = 0.6


@dataclass
class Rollout:
    verdict: Verdict | None = None  # BREACH, PROMOTE, or None when time ran out
    at: float = 0.0
    split: float = 0.0
    reason: str = ""
    first_candidate_failure: float | None = None
    seen: list[tuple[float, Verdict, float]] = field(default_factory=list)  # (time, verdict, split)


def simulate(
    seed: int,
    *,
    rate: float,
    candidate: Pool,
    stable: Pool,
    interval: float = 10.0,
    tick: float = 0.1,
    until: float = 120.0,
) -> Rollout:
    """Requests at a steady `rate`, a share of them to the candidate spread evenly (as the
    router does); the controller evaluates every `tick` from the start of the current step."""
    rng = random.Random(seed)
    windows = {True: PoolWindow(span=60), False: PoolWindow(span=60)}
    pools = {True: candidate, False: stable}
    error_test = ErrorTest(THRESHOLD.max_error_rate, steps=analysed_steps(STEPS))
    now = 0.0
    step = StepState(index=0, started_at=now, split=STEPS[0])
    out = Rollout()
    owed = 0.0
    next_tick = now + tick
    while now < until:
        now += 1.0 / rate
        owed += step.split / 100
        to_candidate = owed >= 1.0
        if to_candidate:
            owed -= 1.0
        pool = pools[to_candidate]
        error = rng.random() < pool.error_rate
        windows[to_candidate].record(
            now, error, rng.lognormvariate(math.log(pool.median), pool.sigma)
        )
        if error and to_candidate and out.first_candidate_failure is None:
            out.first_candidate_failure = now
        if now < next_tick:
            continue
        next_tick += tick
        got = decide_adaptive(
            now=now,
            step=step,
            steps=STEPS,
            interval=interval,
            threshold=THRESHOLD,
            candidate=windows[True].figures(now, since=step.started_at),
            stable=windows[False].figures(now, since=step.started_at),
            error_test=error_test,
        )
        out.seen.append((now, got.verdict, step.split))
        if got.verdict is Verdict.ADVANCE:
            assert got.next_split is not None
            step = StepState(index=step.index + 1, started_at=now, split=got.next_split)
        elif got.verdict in (Verdict.BREACH, Verdict.PROMOTE):
            out.verdict, out.at, out.split, out.reason = got.verdict, now, step.split, got.reason
            return out
    return out


def test_candidate_failing_everything_is_rolled_back_within_a_second() -> None:
    for seed in range(5):
        # 5,000 req/s: 50 candidate requests a second at the 1 % first step.
        got = simulate(seed, rate=5000, candidate=Pool(error_rate=1.0), stable=Pool())
        assert got.verdict is Verdict.BREACH
        assert got.split == 1.0
        assert got.first_candidate_failure is not None
        delay = got.at - got.first_candidate_failure
        assert delay <= 1.0, got.reason
    print(f"\n100% failing: breach {delay * 1000:.0f} ms after the first failure: {got.reason}")


def test_candidate_failing_five_percent_is_rolled_back_before_25() -> None:
    for seed in range(10):
        got = simulate(seed, rate=5000, candidate=Pool(error_rate=0.05), stable=Pool())
        assert got.verdict is Verdict.BREACH, got.seen[-1]
        assert got.split <= 25.0
        assert all(split <= 25.0 for _, _, split in got.seen)
    print(f"\n5% failing: {got.reason} at split {got.split:g}%")


def test_candidate_three_times_slower_is_rolled_back_on_the_ratio() -> None:
    for seed in range(5):
        got = simulate(
            seed, rate=5000, candidate=Pool(median=0.06), stable=Pool(median=0.02), until=30
        )
        assert got.verdict is Verdict.BREACH, got.seen[-1]
        assert "x stable p99" in got.reason
        assert got.split == 1.0
    print(f"\n3x slower: {got.reason} after {got.at:.1f} s")


def test_candidate_as_good_as_stable_is_promoted() -> None:
    same = Pool(error_rate=0.005, sigma=0.9)
    breaches = 0
    for seed in range(30):
        # 1,000 req/s and a 5 s interval: 50 candidate outcomes by the end of the 1 % step.
        got = simulate(seed, rate=1000, candidate=same, stable=same, interval=5.0, tick=0.25)
        assert got.verdict is not None, got.seen[-1]
        breaches += got.verdict is Verdict.BREACH
        if got.verdict is Verdict.PROMOTE:
            splits = [split for _, verdict, split in got.seen if verdict is Verdict.ADVANCE]
            assert splits == [1.0, 5.0, 25.0]
            assert got.split == 50.0
    print(f"\nequal pools: {breaches} breaches in 30 rollouts (designed: 1% per rollout)")
    assert breaches == 0


def test_little_traffic_is_insufficient_data_never_an_advance() -> None:
    got = simulate(1, rate=20, candidate=Pool(), stable=Pool(), interval=5.0, tick=0.25, until=60)
    assert got.verdict is None
    after = {verdict for at, verdict, _ in got.seen if at >= 5.0}
    assert after == {Verdict.INSUFFICIENT_DATA}
    assert {verdict for at, verdict, _ in got.seen if at < 5.0} == {Verdict.HOLD}
