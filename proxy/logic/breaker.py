"""Per-upstream circuit breaker: closed, open, half-open, on an injected monotonic clock.

Policy (DESIGN.md `breaker`):

- CLOSED: every outcome is counted. The breaker opens on `consecutive_failures` failures in a
  row, or when the sliding `window` holds at least `min_requests` outcomes of which a share of
  at least `failure_ratio` failed. The window is a ring of 10 buckets of `window / 10`, so it
  covers between 0.9 and 1.0 `window` of history in constant memory.
- OPEN: no request is let through. After `open_for` the breaker is HALF_OPEN (checked when the
  state is read, which `acquire()` does).
- HALF_OPEN: at most `half_open_requests` trials in flight at once. The breaker closes once
  `half_open_requests` trials have succeeded (all of them, since the first failed trial
  re-opens it). Each re-open doubles `open_for` up to `max_open_for`; closing resets it.

An outcome counts only in the state epoch in which its request was admitted: a result that
arrives after the state changed (a late failure from before the open, a slow request from the
closed era finishing during half-open) is dropped. `epoch` names the current epoch; pass it to
`release(ok, epoch=...)` for exact attribution. Without it a release is attributed to the
current epoch while that epoch has requests in flight, else to an earlier one (exact whenever
the state did not change while the request was in flight).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import final

__all__ = ["Breaker", "BreakerSettings", "BreakerSnapshot", "BreakerState"]

_BUCKETS = 10


class BreakerState(StrEnum):
    """The three states of a breaker; a str, so `str(state)` is its value."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_CLOSED = BreakerState.CLOSED
_OPEN = BreakerState.OPEN
_HALF_OPEN = BreakerState.HALF_OPEN

TransitionHook = Callable[[BreakerState, BreakerState, str], None]


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """A breaker's thresholds (see the module docstring), built once from the configuration."""

    consecutive_failures: int
    failure_ratio: float
    min_requests: int
    window: float
    open_for: float
    half_open_requests: int
    max_open_for: float | None = None  # None: 10 * open_for


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """A breaker's state at one instant, for /status and tests."""

    state: BreakerState
    consecutive_failures: int
    window_requests: int
    window_failures: int
    open_until: float | None
    open_for: float
    reopens: int
    opens: int
    in_flight: int
    trial_successes: int
    epoch: int


def _secs(seconds: float) -> str:
    return f"{seconds:g}s"


@final
class Breaker:
    """Circuit breaker of one upstream; pure logic, time from the injected clock."""

    __slots__ = (
        "_clock",
        "_consecutive",
        "_consecutive_limit",
        "_current",
        "_epoch",
        "_fails",
        "_failure_ratio",
        "_half_open_requests",
        "_head",
        "_head_end",
        "_max_open_for",
        "_min_requests",
        "_on_transition",
        "_open_for",
        "_open_for_now",
        "_open_until",
        "_opens",
        "_reopens",
        "_slot",
        "_stale",
        "_state",
        "_totals",
        "_trial_successes",
        "_w_fails",
        "_w_total",
        "_width",
        "_window",
    )

    def __init__(
        self,
        settings: BreakerSettings,
        *,
        clock: Callable[[], float],
        on_transition: TransitionHook | None = None,
    ) -> None:
        self._clock = clock
        self._on_transition = on_transition

        self._state = _CLOSED
        self._epoch = 0
        self._current = 0  # admitted in this epoch, outcome not yet known (trials if half-open)
        self._stale = 0  # admitted in an earlier epoch, outcome not yet known
        self._consecutive = 0
        self._trial_successes = 0
        self._open_until = 0.0  # meaningful only while OPEN
        self._open_for_now = settings.open_for
        self._reopens = 0
        self._opens = 0

        self._window = 0.0  # set by retune(), which also sets up the buckets
        self._totals = [0] * _BUCKETS
        self._fails = [0] * _BUCKETS
        self._w_total = 0
        self._w_fails = 0
        self._width = 1.0
        self._head = self._slot = 0
        self._head_end = 0.0
        self.retune(settings)

    def retune(self, settings: BreakerSettings) -> None:
        """Set the thresholds; again at a reload, for a breaker that keeps its state: an open
        breaker stays open until its current period ends, trials under way finish. A new
        window length starts its counts afresh."""
        s = settings
        if s.consecutive_failures < 1:
            raise ValueError("consecutive_failures must be >= 1")
        if not 0.0 < s.failure_ratio <= 1.0:
            raise ValueError("failure_ratio must be in (0, 1]")
        if s.min_requests < 1:
            raise ValueError("min_requests must be >= 1")
        if s.window <= 0 or s.open_for <= 0:
            raise ValueError("window and open_for must be > 0")
        if s.half_open_requests < 1:
            raise ValueError("half_open_requests must be >= 1")
        # Copied into slots, not read through `settings`: the request path reads them often.
        self._consecutive_limit = s.consecutive_failures
        self._failure_ratio = s.failure_ratio
        self._min_requests = s.min_requests
        self._half_open_requests = s.half_open_requests
        open_for = self._open_for = s.open_for
        # The cap never undercuts the first open period.
        cap = s.max_open_for
        self._max_open_for = max(open_for, 10 * open_for if cap is None else cap)
        if self._state is _CLOSED:
            self._open_for_now = open_for
        else:  # a period grown by re-opens stays grown, within the new bounds
            self._open_for_now = min(max(self._open_for_now, open_for), self._max_open_for)
        if s.window != self._window:
            self._window = s.window
            self._width = s.window / _BUCKETS
            self._clear_window()
            self._set_head(int(self._clock() // self._width))

    # -- reading -----------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        if self._state is _OPEN and self._clock() >= self._open_until:
            self._half_open()
        return self._state

    @property
    def epoch(self) -> int:
        """Changes at every state transition; pass the value read after `acquire()` to
        `release()` so a late outcome is never counted against a later state."""
        return self._epoch

    def snapshot(self) -> BreakerSnapshot:
        state = self.state
        if state is _CLOSED:
            self._advance(self._clock())
        return BreakerSnapshot(
            state=state,
            consecutive_failures=self._consecutive,
            window_requests=self._w_total,
            window_failures=self._w_fails,
            open_until=self._open_until if state is _OPEN else None,
            open_for=self._open_for_now,
            reopens=self._reopens,
            opens=self._opens,
            in_flight=self._current + self._stale,
            trial_successes=self._trial_successes,
            epoch=self._epoch,
        )

    def __repr__(self) -> str:
        # No lazy transition here: a repr must not change what it describes.
        parts = [f"<Breaker {self._state.value}"]
        if self._state is _CLOSED:
            parts.append(
                f"consecutive={self._consecutive}/{self._consecutive_limit}"
                f" window={self._w_fails}/{self._w_total}"
            )
        elif self._state is _OPEN:
            parts.append(f"until={self._open_until:.3f} open_for={_secs(self._open_for_now)}")
        else:
            parts.append(
                f"trials={self._current}/{self._half_open_requests}"
                f" succeeded={self._trial_successes}"
            )
        parts.append(f"reopens={self._reopens} stale={self._stale}>")
        return " ".join(parts)

    # -- the request path ----------------------------------------------------------------------

    def acquire(self) -> bool:
        """May a request go to this upstream now? Takes a trial slot when half-open."""
        state = self._state
        if state is _CLOSED:
            self._current += 1
            return True
        if state is _OPEN:
            if self._clock() < self._open_until:
                return False
            self._half_open()
        if self._current >= self._half_open_requests:
            return False
        self._current += 1
        return True

    def release(self, ok: bool | None, *, epoch: int | None = None) -> None:
        """Report the outcome of a request `acquire()` let through; exactly once per such call.

        ok=None means no verdict (the client went away, the proxy shed it): the request's slot
        is freed and nothing is counted.
        """
        stale = self._current == 0 if epoch is None else epoch != self._epoch
        if stale:
            if self._stale <= 0:
                raise RuntimeError("Breaker.release() without a matching acquire()")
            self._stale -= 1
            return
        if self._current <= 0:
            raise RuntimeError("Breaker.release() without a matching acquire()")
        self._current -= 1
        if ok is None:
            return
        if self._state is _CLOSED:
            # The per-request path: inlined, one clock read; a reason is formatted only on a trip.
            now = self._clock()
            if now >= self._head_end:
                self._advance(now)
            slot = self._slot
            self._totals[slot] += 1
            total = self._w_total + 1
            self._w_total = total
            if ok:
                self._consecutive = 0
            else:
                self._fails[slot] += 1
                self._w_fails += 1
                self._consecutive += 1
                if self._consecutive >= self._consecutive_limit:
                    self._open(f"{self._consecutive} consecutive failures")
                    return
            # A success can trip too: it may bring the window up to min_requests.
            if total >= self._min_requests and self._w_fails >= self._failure_ratio * total:
                self._trip_on_ratio()
        elif ok:
            # Only HALF_OPEN reaches here: OPEN admits nothing, so its epoch has no requests.
            self._trial_successes += 1
            if self._trial_successes >= self._half_open_requests:
                n = self._trial_successes
                self._close("trial succeeded" if n == 1 else f"{n} trials succeeded")
        else:
            self._open_for_now = min(self._open_for_now * 2, self._max_open_for)
            self._reopens += 1
            self._open("trial failed")

    # -- closed-state accounting ---------------------------------------------------------------

    def _trip_on_ratio(self) -> None:
        fails, total = self._w_fails, self._w_total
        self._open(
            f"failure ratio {fails / total:.2f} over {_secs(self._window)} ({fails}/{total})"
        )

    def _advance(self, now: float) -> None:
        idx = int(now // self._width)
        head = self._head
        if idx <= head:
            return
        if idx - head >= _BUCKETS:
            self._clear_window()
        else:
            totals, fails = self._totals, self._fails
            for i in range(head + 1, idx + 1):
                slot = i % _BUCKETS
                self._w_total -= totals[slot]
                self._w_fails -= fails[slot]
                totals[slot] = 0
                fails[slot] = 0
        self._set_head(idx)

    def _set_head(self, idx: int) -> None:
        self._head = idx
        self._slot = idx % _BUCKETS
        self._head_end = (idx + 1) * self._width

    def _clear_window(self) -> None:
        for slot in range(_BUCKETS):
            self._totals[slot] = 0
            self._fails[slot] = 0
        self._w_total = 0
        self._w_fails = 0

    # -- transitions ---------------------------------------------------------------------------

    def _open(self, reason: str) -> None:
        self._opens += 1
        self._open_until = self._clock() + self._open_for_now
        self._move(_OPEN, reason)

    def _half_open(self) -> None:
        self._move(_HALF_OPEN, f"open_for {_secs(self._open_for_now)} elapsed")

    def _close(self, reason: str) -> None:
        self._open_for_now = self._open_for
        self._reopens = 0
        # A fresh start: failures from before the open must not trip the breaker again.
        self._consecutive = 0
        self._clear_window()
        self._set_head(int(self._clock() // self._width))
        self._move(_CLOSED, reason)

    def _move(self, new: BreakerState, reason: str) -> None:
        old = self._state
        self._state = new
        self._epoch += 1
        # Requests admitted so far belong to the old state; their outcomes will be dropped.
        self._stale += self._current
        self._current = 0
        self._trial_successes = 0
        hook = self._on_transition
        if hook is not None:
            hook(old, new, reason)
