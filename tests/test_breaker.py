"""Breaker: every transition and bound, on a fake clock."""

from __future__ import annotations

import collections
import dataclasses
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.logic.breaker import Breaker, BreakerSettings, BreakerState

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Transition = tuple[BreakerState, BreakerState, str]


def make(clock: FakeClock, log: list[Transition] | None = None, **overrides: Any) -> Breaker:
    params: dict[str, Any] = {
        "consecutive_failures": 5,
        "failure_ratio": 0.5,
        "min_requests": 20,
        "window": 10.0,
        "open_for": 5.0,
        "half_open_requests": 3,
    }
    params.update(overrides)

    def hook(old: BreakerState, new: BreakerState, reason: str) -> None:
        if log is not None:
            log.append((old, new, reason))

    return Breaker(BreakerSettings(**params), clock=clock, on_transition=hook)


def outcome(b: Breaker, ok: bool | None) -> None:
    assert b.acquire()
    b.release(ok)


def trip(b: Breaker, n: int = 5) -> None:
    for _ in range(n):
        outcome(b, False)
    assert b.state is OPEN


def to_half_open(b: Breaker, clock: FakeClock) -> None:
    snap = b.snapshot()
    assert snap.open_until is not None
    clock.now = snap.open_until
    assert b.state is HALF_OPEN


# -- closed ------------------------------------------------------------------------------------


def test_starts_closed_and_lets_everything_through() -> None:
    b = make(FakeClock())
    assert b.state is CLOSED
    assert all(b.acquire() for _ in range(1000))
    snap = b.snapshot()
    assert snap.in_flight == 1000
    assert snap.open_until is None
    assert (snap.opens, snap.reopens, snap.window_requests) == (0, 0, 0)
    assert repr(b).startswith("<Breaker closed consecutive=0/5 window=0/0")


def test_opens_on_consecutive_failures() -> None:
    clock = FakeClock()
    log: list[Transition] = []
    b = make(clock, log, min_requests=1000)
    for _ in range(4):
        outcome(b, False)
    assert b.state is CLOSED
    assert b.snapshot().consecutive_failures == 4
    outcome(b, False)
    assert b.state is OPEN
    assert log == [(CLOSED, OPEN, "5 consecutive failures")]
    snap = b.snapshot()
    assert snap.open_until == clock.now + 5.0
    assert snap.opens == 1
    assert not b.acquire()
    assert repr(b).startswith("<Breaker open until=1005.000 open_for=5s")


def test_a_success_resets_the_consecutive_count() -> None:
    b = make(FakeClock(), min_requests=1000)
    for _ in range(10):
        for _ in range(4):
            outcome(b, False)
        outcome(b, True)
    assert b.state is CLOSED
    assert b.snapshot().consecutive_failures == 0
    assert b.snapshot().window_failures == 40


def test_ratio_waits_for_min_requests() -> None:
    log: list[Transition] = []
    b = make(FakeClock(), log, consecutive_failures=1000)
    for i in range(19):
        outcome(b, i % 2 == 1)  # 10 failures, 9 successes: ratio 0.53 but only 19 outcomes
    assert b.state is CLOSED
    assert (b.snapshot().window_failures, b.snapshot().window_requests) == (10, 19)
    outcome(b, True)  # a success brings the window to min_requests at exactly 0.5
    assert b.state is OPEN
    assert log == [(CLOSED, OPEN, "failure ratio 0.50 over 10s (10/20)")]


def test_ratio_below_threshold_stays_closed() -> None:
    b = make(FakeClock(), consecutive_failures=1000)
    for i in range(200):
        outcome(b, i % 5 < 3)  # 60 % success, 40 % failures
    assert b.state is CLOSED
    assert b.snapshot().window_requests == 200


def test_ratio_reason_names_the_figures() -> None:
    log: list[Transition] = []
    b = make(FakeClock(), log, consecutive_failures=1000, min_requests=50, failure_ratio=0.6)
    for _ in range(19):
        outcome(b, True)
    for _ in range(30):
        outcome(b, False)
    assert b.state is CLOSED  # 49 outcomes
    outcome(b, False)
    assert log == [(CLOSED, OPEN, "failure ratio 0.62 over 10s (31/50)")]


def test_window_slides_old_outcomes_out() -> None:
    clock = FakeClock(0.0)
    b = make(clock, consecutive_failures=1000)
    for _ in range(10):
        outcome(b, False)
    clock.now = 4.0
    for _ in range(5):
        outcome(b, True)
    assert (b.snapshot().window_failures, b.snapshot().window_requests) == (10, 15)
    clock.now = 9.99  # bucket 9 of 0..9: everything still inside
    assert b.snapshot().window_requests == 15
    clock.now = 10.0  # bucket 0 (t in [0, 1)) drops out
    assert (b.snapshot().window_failures, b.snapshot().window_requests) == (0, 5)
    clock.now = 14.0  # bucket 4 drops out too
    assert b.snapshot().window_requests == 0
    clock.now = 1000.0  # a jump past the whole ring
    outcome(b, True)
    assert b.snapshot().window_requests == 1


@pytest.mark.parametrize(("later", "opens"), [(9.5, True), (10.0, False)])
def test_failures_count_only_inside_the_window(later: float, opens: bool) -> None:
    clock = FakeClock(0.0)
    b = make(clock, consecutive_failures=1000)
    for _ in range(10):
        outcome(b, False)
    clock.now = later
    for _ in range(10):
        outcome(b, True)
    assert (b.state is OPEN) is opens


def test_no_verdict_is_not_counted_in_closed() -> None:
    b = make(FakeClock())
    for _ in range(4):
        outcome(b, False)
    outcome(b, None)  # neither a failure nor a success: the run of failures goes on
    snap = b.snapshot()
    assert (snap.consecutive_failures, snap.window_requests, snap.in_flight) == (4, 4, 0)
    outcome(b, False)
    assert b.state is OPEN


# -- open and half-open ------------------------------------------------------------------------


def test_open_turns_half_open_after_open_for() -> None:
    clock = FakeClock()
    log: list[Transition] = []
    b = make(clock, log)
    trip(b)
    clock.advance(4.999)
    assert b.state is OPEN
    assert not b.acquire()
    clock.advance(0.001)
    assert b.state is HALF_OPEN
    assert log[-1] == (OPEN, HALF_OPEN, "open_for 5s elapsed")


def test_acquire_itself_notices_open_for_elapsed() -> None:
    clock = FakeClock()
    b = make(clock)
    trip(b)
    clock.advance(5.0)
    assert b.acquire()  # no state read in between
    assert b.snapshot().state is HALF_OPEN
    assert b.snapshot().in_flight == 1


def test_half_open_limits_concurrent_trials() -> None:
    clock = FakeClock()
    b = make(clock)
    trip(b)
    to_half_open(b, clock)
    assert [b.acquire() for _ in range(5)] == [True, True, True, False, False]
    assert repr(b).startswith("<Breaker half_open trials=3/3 succeeded=0")
    b.release(True)
    assert b.acquire()  # the freed trial slot, and only that one
    assert not b.acquire()
    assert b.state is HALF_OPEN
    assert b.snapshot().trial_successes == 1


def test_trials_must_all_succeed_to_close() -> None:
    clock = FakeClock()
    log: list[Transition] = []
    b = make(clock, log)
    trip(b)
    to_half_open(b, clock)
    for _ in range(3):
        assert b.acquire()
    b.release(True)
    b.release(True)
    assert b.state is HALF_OPEN
    b.release(True)
    assert b.state is CLOSED
    assert log[-1] == (HALF_OPEN, CLOSED, "3 trials succeeded")
    snap = b.snapshot()
    assert (snap.consecutive_failures, snap.window_requests, snap.reopens) == (0, 0, 0)
    assert snap.open_until is None


def test_single_trial_success_closes() -> None:
    clock = FakeClock()
    log: list[Transition] = []
    b = make(clock, log, half_open_requests=1)
    trip(b)
    to_half_open(b, clock)
    assert b.acquire()
    assert not b.acquire()
    b.release(True)
    assert log[-1] == (HALF_OPEN, CLOSED, "trial succeeded")


def test_no_verdict_frees_a_trial_slot_without_counting() -> None:
    clock = FakeClock()
    b = make(clock, half_open_requests=1)
    trip(b)
    to_half_open(b, clock)
    assert b.acquire()
    b.release(None)
    assert b.state is HALF_OPEN
    assert b.snapshot().trial_successes == 0
    assert b.acquire()
    b.release(True)
    assert b.state is CLOSED


def test_failed_trial_reopens_with_doubled_open_for_up_to_the_cap() -> None:
    clock = FakeClock()
    log: list[Transition] = []
    b = make(clock, log, max_open_for=30.0)
    trip(b)
    periods = []
    for _ in range(5):
        to_half_open(b, clock)
        assert b.acquire()
        b.release(False)
        snap = b.snapshot()
        assert snap.state is OPEN
        assert snap.open_until == clock.now + snap.open_for
        periods.append(snap.open_for)
    assert periods == [10.0, 20.0, 30.0, 30.0, 30.0]
    assert log[-1] == (HALF_OPEN, OPEN, "trial failed")
    assert log[-2] == (OPEN, HALF_OPEN, "open_for 30s elapsed")
    assert (b.snapshot().reopens, b.snapshot().opens) == (5, 6)


def test_default_cap_is_ten_times_open_for() -> None:
    clock = FakeClock()
    b = make(clock, open_for=1.0)
    trip(b)
    for _ in range(8):
        to_half_open(b, clock)
        outcome(b, False)
    assert b.snapshot().open_for == 10.0


def test_closing_resets_open_for() -> None:
    clock = FakeClock()
    b = make(clock, half_open_requests=1)
    trip(b)
    for _ in range(2):
        to_half_open(b, clock)
        outcome(b, False)
    assert b.snapshot().open_for == 20.0
    to_half_open(b, clock)
    outcome(b, True)
    assert b.state is CLOSED
    trip(b)
    assert b.snapshot().open_for == 5.0
    assert b.snapshot().reopens == 0


def test_full_cycle_reasons() -> None:
    clock = FakeClock()
    log: list[Transition] = []
    b = make(clock, log, half_open_requests=2)
    trip(b)
    to_half_open(b, clock)
    outcome(b, False)
    to_half_open(b, clock)
    outcome(b, True)
    outcome(b, True)
    assert log == [
        (CLOSED, OPEN, "5 consecutive failures"),
        (OPEN, HALF_OPEN, "open_for 5s elapsed"),
        (HALF_OPEN, OPEN, "trial failed"),
        (OPEN, HALF_OPEN, "open_for 10s elapsed"),
        (HALF_OPEN, CLOSED, "2 trials succeeded"),
    ]


# -- late outcomes -----------------------------------------------------------------------------


def test_late_failures_while_open_are_ignored() -> None:
    clock = FakeClock()
    log: list[Transition] = []
    b = make(clock, log)
    for _ in range(3):
        assert b.acquire()  # slow requests, still in flight when the breaker opens
    trip(b)
    before = b.snapshot()
    clock.advance(2.0)
    for _ in range(3):
        b.release(False)
    after = b.snapshot()
    assert after.open_until == before.open_until
    assert (after.opens, after.in_flight, after.state) == (1, 0, OPEN)
    assert len(log) == 1


def test_late_closed_era_outcomes_do_not_count_as_trials() -> None:
    clock = FakeClock()
    b = make(clock)
    assert b.acquire()
    old_epoch = b.epoch  # a slow request admitted while closed
    trip(b)
    to_half_open(b, clock)
    assert b.acquire()
    trial_epoch = b.epoch
    b.release(True, epoch=old_epoch)  # the slow request ends first, during half-open
    snap = b.snapshot()
    assert (snap.state, snap.trial_successes, snap.in_flight) == (HALF_OPEN, 0, 1)
    assert [b.acquire() for _ in range(3)] == [True, True, False]  # still 1 trial in flight
    b.release(True, epoch=trial_epoch)
    assert b.snapshot().trial_successes == 1


def test_late_closed_era_failure_does_not_reopen_half_open() -> None:
    clock = FakeClock()
    b = make(clock)
    assert b.acquire()
    old_epoch = b.epoch
    trip(b)
    to_half_open(b, clock)
    b.release(False, epoch=old_epoch)
    assert b.state is HALF_OPEN
    assert b.snapshot().opens == 1


def test_late_trial_outcome_after_close_is_ignored() -> None:
    clock = FakeClock()
    b = make(clock, half_open_requests=2, consecutive_failures=1)
    trip(b, 1)
    to_half_open(b, clock)
    assert b.acquire()
    first = b.epoch
    assert b.acquire()
    b.release(False, epoch=first)  # re-opens; the other trial is now stale
    to_half_open(b, clock)
    outcome(b, True)
    outcome(b, True)
    assert b.state is CLOSED
    b.release(False, epoch=first)  # the stale trial fails late: consecutive_failures=1 ignores it
    assert b.state is CLOSED
    assert b.snapshot().consecutive_failures == 0


def test_release_without_epoch_while_open_is_stale() -> None:
    clock = FakeClock()
    b = make(clock)
    assert b.acquire()
    trip(b)
    to_half_open(b, clock)
    b.release(False)  # no trial in flight: it can only be the closed-era request
    assert b.state is HALF_OPEN


def test_release_without_acquire_is_an_error() -> None:
    b = make(FakeClock())
    with pytest.raises(RuntimeError):
        b.release(True)
    assert b.acquire()
    b.release(True)
    with pytest.raises(RuntimeError):
        b.release(False, epoch=b.epoch)
    with pytest.raises(RuntimeError):
        b.release(False, epoch=b.epoch - 1)


@pytest.mark.parametrize(
    "bad",
    [
        {"consecutive_failures": 0},
        {"failure_ratio": 0.0},
        {"failure_ratio": 1.5},
        {"min_requests": 0},
        {"window": 0.0},
        {"open_for": 0.0},
        {"half_open_requests": 0},
    ],
)
def test_rejects_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        make(FakeClock(), **bad)


def test_state_is_a_string() -> None:
    assert str(BreakerState.HALF_OPEN) == "half_open"
    assert BreakerState("open") is OPEN


# -- any interleaving --------------------------------------------------------------------------

# Weighted so that walks reach half-open often: failures are likelier than successes.
KINDS = ["acquire"] * 4 + ["fail"] * 3 + ["ok", "none", "advance"]
ADVANCES = [1.0, 5.0, 11.0]
Op = tuple[str, int]


def walk(ops: list[Op]) -> collections.Counter[BreakerState]:
    """Play acquire/release/advance steps, checking the books after every one."""
    clock = FakeClock(0.0)
    b = make(clock, consecutive_failures=2, min_requests=4, half_open_requests=2)
    seen: collections.Counter[BreakerState] = collections.Counter()
    outstanding: list[int] = []  # epoch of every admitted request without an outcome
    for kind, arg in ops:
        if kind == "acquire":
            if b.acquire():
                outstanding.append(b.epoch)
        elif kind == "advance":
            clock.advance(ADVANCES[arg % len(ADVANCES)])
        elif outstanding:
            epoch = outstanding.pop(arg % len(outstanding))
            ok = {"fail": False, "ok": True, "none": None}[kind]
            before = b.snapshot()
            b.release(ok, epoch=epoch)
            if epoch != before.epoch or ok is None:
                # Stale or verdict-less: only the in-flight count moves.
                expected = dataclasses.replace(before, in_flight=before.in_flight - 1)
                assert b.snapshot() == expected
        snap = b.snapshot()
        seen[snap.state] += 1
        assert snap.in_flight == len(outstanding)
        current = sum(1 for e in outstanding if e == snap.epoch)
        if snap.state is HALF_OPEN:
            assert current <= 2
            assert snap.trial_successes < 2
        elif snap.state is OPEN:
            assert current == 0
            assert snap.open_until is not None
            assert 5.0 <= snap.open_for <= 50.0
        else:
            assert snap.consecutive_failures < 2
    for epoch in outstanding:
        b.release(True, epoch=epoch)
    assert b.snapshot().in_flight == 0
    return seen


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 30)), max_size=100))
def test_any_interleaving_keeps_the_books(ops: list[Op]) -> None:
    walk(ops)


def test_seeded_walks_keep_the_books() -> None:
    rng = random.Random(7)
    seen: collections.Counter[BreakerState] = collections.Counter()
    for _ in range(100):
        seen += walk([(rng.choice(KINDS), rng.randrange(30)) for _ in range(150)])
    assert min(seen[s] for s in BreakerState) > 500  # every state was well exercised


def test_retune_keeps_the_state_and_applies_new_thresholds() -> None:
    clock = FakeClock()
    b = make(clock, min_requests=1000)
    for _ in range(3):
        outcome(b, False)
    # Lowered to 3 consecutive failures: the count so far stands, the next failure opens.
    b.retune(BreakerSettings(
        consecutive_failures=3, failure_ratio=0.5, min_requests=1000, window=10.0,
        open_for=2.0, half_open_requests=1,
    ))  # fmt: skip
    assert b.state is CLOSED
    epoch = b.epoch
    outcome(b, False)
    assert b.state is OPEN
    assert b.epoch == epoch + 1
    snap = b.snapshot()
    assert snap.open_until == clock.now + 2.0
    to_half_open(b, clock)
    assert b.acquire()
    assert not b.acquire()
    # A new window length starts its counts afresh; an open period under way is kept.
    b.release(False)
    assert b.state is OPEN
    until = b.snapshot().open_until
    b.retune(BreakerSettings(
        consecutive_failures=3, failure_ratio=0.5, min_requests=1000, window=30.0,
        open_for=1.0, half_open_requests=1,
    ))  # fmt: skip
    assert b.state is OPEN
    assert b.snapshot().open_until == until
    assert b.snapshot().window_requests == 0
