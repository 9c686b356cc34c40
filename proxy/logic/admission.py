"""Per-upstream admission: a concurrency limit, a bounded FIFO queue and an optional rate limit.

This is shedding, not ejection (that is the breaker's job): past `max_in_flight` a request
waits in a queue of at most `queue` places for at most `queue_timeout`; past either bound it
is shed at once with a reason, which the proxy answers with 503 and Retry-After.

The rate limit is a small token bucket of our own (burst: one second of `rate`, at least 1),
on the clock of the loop passed in (time.monotonic without one). aiolimiter's `acquire()` is
a coroutine, so a synchronous non-blocking take on the fast path would have to reach into its
private level.
Tokens are taken only by requests that are admitted or queued, never by shed ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, final

__all__ = [
    "SHED_REASONS",
    "Admission",
    "AdmissionSnapshot",
    "IdleWait",
    "Limits",
    "Shed",
    "ShedReason",
]

ShedReason = Literal["queue_full", "queue_timeout", "rate_limited"]
SHED_REASONS: Final[tuple[ShedReason, ...]] = ("queue_full", "queue_timeout", "rate_limited")


class Shed(Exception):
    """A request refused by admission; `reason` says which bound it hit."""

    reason: ShedReason

    def __init__(self, reason: ShedReason) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Limits:
    """An upstream's admission limits, built once from the configuration."""

    max_in_flight: int  # requests admitted at once
    queue: int  # places in the queue behind them
    queue_timeout: float  # seconds a queued request waits at most
    rate: float | None = None  # requests admitted or queued per second; None: no rate limit


@dataclass(frozen=True, slots=True)
class AdmissionSnapshot:
    """An admission's state at one instant, for /status and tests."""

    in_flight: int
    queued: int
    max_in_flight: int
    queue: int
    queue_timeout: float
    rate: float | None
    shed_queue_full: int
    shed_queue_timeout: int
    shed_rate_limited: int


class _TokenBucket:
    """`rate` tokens a second, holding at most `burst`; starts full."""

    __slots__ = ("_burst", "_clock", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self._rate = rate
        self._burst = max(1.0, rate)
        self._clock = clock
        self._tokens = self._burst
        self._last = clock()

    def take(self) -> bool:
        now = self._clock()
        tokens = self._tokens + (now - self._last) * self._rate
        self._last = now
        if tokens > self._burst:
            tokens = self._burst
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False


@final
class IdleWait:
    """Wakes whoever waits for a count of requests in flight to reach zero: the owner calls
    `wake()` when its count does."""

    __slots__ = ("_loop", "_pending")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._pending: asyncio.Future[None] | None = None

    def wake(self) -> None:
        pending = self._pending
        if pending is not None:
            self._pending = None
            if not pending.done():
                pending.set_result(None)

    async def until(self, busy: Callable[[], bool]) -> None:
        """Return once `busy()` is false, checked again at every wake()."""
        while busy():
            pending = self._pending
            if pending is None:
                loop = self._loop if self._loop is not None else asyncio.get_running_loop()
                pending = self._pending = loop.create_future()
            # Shielded: one waiter given up (its timeout) leaves the others waiting.
            await asyncio.shield(pending)


@final
class Admission:
    """Per-upstream backpressure: at most max_in_flight admitted, then a FIFO queue of at most
    `queue` waiters, each waiting at most queue_timeout; past either bound, Shed at once."""

    __slots__ = (
        "_bucket",
        "_idle",
        "_in_flight",
        "_loop",
        "_max_in_flight",
        "_queue",
        "_queue_timeout",
        "_rate",
        "_shed_full",
        "_shed_rate",
        "_shed_timeout",
        "_waiters",
    )

    def __init__(self, limits: Limits, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._in_flight = 0
        # Futures resolve True when handed a slot, False when their queue_timeout expired.
        # Only not-yet-resolved futures sit here, except a cancelled one for the instant between
        # its cancellation and its task running. The length check in enter() keeps appends
        # below maxlen, so the deque never silently drops a waiter. (A negative queue is
        # refused by retune() below, with its own message.)
        self._waiters: deque[asyncio.Future[bool]] = deque(maxlen=max(limits.queue, 0))
        self._shed_full = 0
        self._shed_timeout = 0
        self._shed_rate = 0
        self._rate: float | None = None
        self._bucket: _TokenBucket | None = None
        # Whoever waits for nothing to be left in flight (a drain).
        self._idle = IdleWait(loop)
        self.retune(limits)

    def retune(self, limits: Limits) -> None:
        """Set the limits; again at a reload, for an upstream that keeps its requests in flight
        and its queue: waiters already queued keep their place (even beyond a smaller queue)
        and get the slots a larger max_in_flight frees at once; the new queue_timeout applies
        to requests queued from now on."""
        max_in_flight, queue, rate = limits.max_in_flight, limits.queue, limits.rate
        queue_timeout = limits.queue_timeout
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if queue < 0:
            raise ValueError("queue must be >= 0")
        if queue_timeout <= 0:
            raise ValueError("queue_timeout must be > 0")
        if rate is not None and rate <= 0:
            raise ValueError("rate must be > 0 or None")
        self._max_in_flight = max_in_flight
        self._queue = queue
        self._queue_timeout = queue_timeout
        if rate != self._rate:
            self._rate = rate
            clock = self._loop.time if self._loop is not None else time.monotonic
            self._bucket = None if rate is None else _TokenBucket(rate, clock)
        waiters = self._waiters
        if waiters.maxlen != max(queue, len(waiters)):
            self._waiters = deque(waiters, maxlen=max(queue, len(waiters)))
        while self._waiters and self._in_flight < self._max_in_flight:
            fut = self._waiters.popleft()
            if not fut.done():
                self._in_flight += 1
                fut.set_result(True)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def full(self) -> bool:
        return self._in_flight >= self._max_in_flight and len(self._waiters) >= self._queue

    def try_enter(self) -> bool:
        """Take a slot if one is free and nobody is queued; raise Shed("rate_limited") if the
        rate limit refuses it. False means: call `enter()` to queue."""
        # While anyone waits, leave() hands slots over instead of freeing them, so a free slot
        # already implies an empty queue; the second test only makes overtaking impossible.
        if self._in_flight < self._max_in_flight and not self._waiters:
            bucket = self._bucket
            if bucket is not None and not bucket.take():
                self._shed_rate += 1
                raise Shed("rate_limited")
            self._in_flight += 1
            return True
        return False

    async def enter(self) -> None:
        """Take a slot, waiting in the FIFO queue if need be; raise Shed when a bound is hit.

        On return the caller holds a slot and must call `leave()` exactly once.
        """
        if self.try_enter():
            return
        waiters = self._waiters
        if len(waiters) >= self._queue:
            self._shed_full += 1
            raise Shed("queue_full")
        bucket = self._bucket
        if bucket is not None and not bucket.take():
            self._shed_rate += 1
            raise Shed("rate_limited")
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        waiters.append(fut)
        timer = loop.call_later(self._queue_timeout, self._expire, fut)
        # No await between the append and the try: every way out of the wait passes below.
        try:
            admitted = await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.result():
                # leave() handed us a slot in the same loop iteration as our cancellation:
                # it is ours now, so pass it on rather than leak it.
                self.leave()
            else:
                self._discard(fut)
            raise
        finally:
            timer.cancel()
        if not admitted:
            self._shed_timeout += 1
            raise Shed("queue_timeout")

    def leave(self) -> None:
        """Free a slot, handing it straight to the first live waiter if there is one."""
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                # in_flight is unchanged: the slot moves from the leaver to the waiter.
                fut.set_result(True)
                return
        if self._in_flight <= 0:
            raise RuntimeError("Admission.leave() without a matching enter()")
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.wake()

    async def until_idle(self) -> None:
        """Return once no request holds a slot (bound it with a timeout)."""
        await self._idle.until(self._busy)

    def _busy(self) -> bool:
        return self._in_flight > 0

    def snapshot(self) -> AdmissionSnapshot:
        return AdmissionSnapshot(
            in_flight=self._in_flight,
            queued=len(self._waiters),
            max_in_flight=self._max_in_flight,
            queue=self._queue,
            queue_timeout=self._queue_timeout,
            rate=self._rate,
            shed_queue_full=self._shed_full,
            shed_queue_timeout=self._shed_timeout,
            shed_rate_limited=self._shed_rate,
        )

    def __repr__(self) -> str:
        rate = "" if self._rate is None else f" rate={self._rate:g}/s"
        return (
            f"<Admission in_flight={self._in_flight}/{self._max_in_flight}"
            f" queued={len(self._waiters)}/{self._queue}"
            f" queue_timeout={self._queue_timeout:g}s{rate}"
            f" shed(full={self._shed_full} timeout={self._shed_timeout}"
            f" rate={self._shed_rate})>"
        )

    def _expire(self, fut: asyncio.Future[bool]) -> None:
        if fut.done():
            return
        self._discard(fut)
        fut.set_result(False)

    def _discard(self, fut: asyncio.Future[bool]) -> None:
        with contextlib.suppress(ValueError):  # leave() may have popped it already
            self._waiters.remove(fut)
