"""Admission: fast path, FIFO queue, shedding, cancellation safety and the rate limit, and an
exchange's attempt, which holds a slot and gives it back once.

Most tests run on an event loop whose clock the test steps (FakeTimeLoop), so queue timeouts
and token refills are exact and nothing sleeps; one test checks expiry on the real clock.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.http.exchange import Attempt
from proxy.http.upstream import Upstream
from proxy.logic.admission import Admission, Limits, Shed


class FakeTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock only moves when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now


Scenario = Callable[[FakeTimeLoop], Coroutine[Any, Any, None]]


def run(scenario: Scenario) -> None:
    loop = FakeTimeLoop()
    try:
        loop.run_until_complete(scenario(loop))
    finally:
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            loop.close()


async def settle() -> None:
    # Enough iterations for woken waiters to run to their end; nothing here waits on a timer.
    for _ in range(4):
        await asyncio.sleep(0)


def shed_reason(task: asyncio.Task[None]) -> str | None:
    exc = task.exception()
    return exc.reason if isinstance(exc, Shed) else None


# -- fast path and bounds ----------------------------------------------------------------------


def test_fast_path_takes_free_slots() -> None:
    adm = Admission(Limits(max_in_flight=3, queue=2, queue_timeout=1.0))
    assert [adm.try_enter() for _ in range(4)] == [True, True, True, False]
    assert (adm.in_flight, adm.queued, adm.full) == (3, 0, False)
    assert repr(adm) == (
        "<Admission in_flight=3/3 queued=0/2 queue_timeout=1s shed(full=0 timeout=0 rate=0)>"
    )
    adm.leave()
    assert adm.in_flight == 2
    assert adm.try_enter()


async def test_enter_returns_at_once_with_a_free_slot() -> None:
    adm = Admission(Limits(max_in_flight=1, queue=0, queue_timeout=1.0))
    await adm.enter()
    assert adm.in_flight == 1
    with pytest.raises(Shed) as info:
        await adm.enter()
    assert info.value.reason == "queue_full"
    assert str(info.value) == "queue_full"
    adm.leave()
    assert adm.in_flight == 0


def test_until_idle_returns_when_the_last_slot_is_left() -> None:
    async def scenario(loop: FakeTimeLoop) -> None:
        adm = Admission(Limits(max_in_flight=2, queue=2, queue_timeout=1.0))
        await adm.until_idle()  # nothing in flight: at once
        assert adm.try_enter()
        assert adm.try_enter()
        first = loop.create_task(adm.until_idle())
        second = loop.create_task(adm.until_idle())
        queued = loop.create_task(adm.enter())
        await settle()
        adm.leave()  # handed to the queued request: still two in flight
        await settle()
        assert queued.done()
        assert not first.done()
        second.cancel()  # one waiter giving up leaves the other waiting
        adm.leave()
        await settle()
        assert not first.done()
        adm.leave()
        await settle()
        assert first.done()
        assert first.exception() is None
        assert second.cancelled()

    run(scenario)


def test_queue_full_sheds_immediately() -> None:
    async def scenario(loop: FakeTimeLoop) -> None:
        adm = Admission(Limits(max_in_flight=1, queue=2, queue_timeout=1.0), loop=loop)
        assert adm.try_enter()
        waiters = [asyncio.create_task(adm.enter()) for _ in range(2)]
        await settle()
        assert (adm.queued, adm.full) == (2, True)
        with pytest.raises(Shed) as info:
            await adm.enter()  # a coroutine that never suspends: shed without waiting
        assert info.value.reason == "queue_full"
        assert loop.now == 0.0
        assert adm.snapshot().shed_queue_full == 1
        assert not any(w.done() for w in waiters)
        for _ in range(2):
            adm.leave()
            await settle()
        assert all(w.done() and w.exception() is None for w in waiters)
        assert (adm.in_flight, adm.queued) == (1, 0)

    run(scenario)


def test_queue_is_fifo() -> None:
    async def scenario(loop: FakeTimeLoop) -> None:
        adm = Admission(Limits(max_in_flight=2, queue=10, queue_timeout=1.0), loop=loop)
        assert adm.try_enter()
        assert adm.try_enter()
        admitted: list[int] = []

        async def client(i: int) -> None:
            await adm.enter()
            admitted.append(i)

        tasks = [asyncio.create_task(client(i)) for i in range(10)]
        await settle()
        assert adm.queued == 10
        assert not adm.try_enter()  # no slot, and queued clients go first
        for n in range(1, 11):
            adm.leave()
            await settle()
            assert admitted == list(range(n))
            assert (adm.in_flight, adm.queued) == (2, 10 - n)
        assert all(t.done() for t in tasks)

    run(scenario)


def test_no_overtaking_while_a_slot_is_handed_over() -> None:
    async def scenario(loop: FakeTimeLoop) -> None:
        adm = Admission(Limits(max_in_flight=1, queue=5, queue_timeout=1.0), loop=loop)
        assert adm.try_enter()
        waiter = asyncio.create_task(adm.enter())
        await settle()
        adm.leave()  # the slot now belongs to the waiter, whose task has not run yet
        assert adm.in_flight == 1
        assert not adm.try_enter()
        await settle()
        assert waiter.done()
        assert waiter.exception() is None

    run(scenario)


def test_queue_timeout() -> None:
    async def scenario(loop: FakeTimeLoop) -> None:
        adm = Admission(Limits(max_in_flight=1, queue=5, queue_timeout=1.0), loop=loop)
        assert adm.try_enter()
        first = asyncio.create_task(adm.enter())
        await settle()
        loop.now = 0.5
        second = asyncio.create_task(adm.enter())
        await settle()
        loop.now = 0.999
        await settle()
        assert adm.queued == 2
        loop.now = 1.0
        await settle()
        assert shed_reason(first) == "queue_timeout"
        assert not second.done()
        assert (adm.in_flight, adm.queued) == (1, 1)
        loop.now = 1.5
        await settle()
        assert shed_reason(second) == "queue_timeout"
        assert (adm.in_flight, adm.queued) == (1, 0)
        assert adm.snapshot().shed_queue_timeout == 2
        adm.leave()
        assert adm.in_flight == 0

    run(scenario)


async def test_queue_timeout_on_the_real_clock() -> None:
    adm = Admission(Limits(max_in_flight=1, queue=1, queue_timeout=0.02))
    assert adm.try_enter()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Shed) as info:
        await asyncio.wait_for(adm.enter(), timeout=5.0)
    assert info.value.reason == "queue_timeout"
    assert loop.time() - started >= 0.019
    assert (adm.in_flight, adm.queued) == (1, 0)


def test_handed_slot_and_timeout_in_the_same_iteration() -> None:
    async def scenario(loop: FakeTimeLoop) -> None:
        adm = Admission(Limits(max_in_flight=1, queue=5, queue_timeout=1.0), loop=loop)
        assert adm.try_enter()
        waiter = asyncio.create_task(adm.enter())
        await settle()
        adm.leave()
        loop.now = 5.0  # the timer is due before the waiter's task resumes
        await settle()
        assert waiter.done()
        assert waiter.exception() is None
        assert adm.in_flight == 1

    run(scenario)


# -- cancellation ------------------------------------------------------------------------------


def test_cancel_while_queued_frees_the_place() -> None:
    async def scenario(loop: FakeTimeLoop) -> None:
        adm = Admission(Limits(max_in_flight=1, queue=1, queue_timeout=1.0), loop=loop)
        assert adm.try_enter()
        waiter = asyncio.create_task(adm.enter())
        await settle()
        assert adm.full
        waiter.cancel()
        await settle()
        assert waiter.cancelled()
        assert (adm.in_flight, adm.queued, adm.full) == (1, 0, False)
        adm.leave()
        assert adm.in_flight == 0  # not handed to the departed waiter

    run(scenario)


def test_cancel_before_the_waiter_runs_is_skipped_by_leave() -> None:
    async def scenario(loop: FakeTimeLoop) -> None:
        adm = Admission(Limits(max_in_flight=1, queue=3, queue_timeout=1.0), loop=loop)
        assert adm.try_enter()
        a = asyncio.create_task(adm.enter())
        b = asyncio.create_task(adm.enter())
        await settle()
        a.cancel()
        adm.leave()  # a's future is already cancelled: b gets the slot
        await settle()
        assert a.cancelled()
        assert b.done()
        assert b.exception() is None
        assert (adm.in_flight, adm.queued) == (1, 0)

    run(scenario)


@pytest.mark.parametrize("others", [0, 1, 3])
def test_cancel_at_the_moment_of_handover_passes_the_slot_on(others: int) -> None:
    async def scenario(loop: FakeTimeLoop) -> None:
        adm = Admission(Limits(max_in_flight=1, queue=5, queue_timeout=1.0), loop=loop)
        assert adm.try_enter()
        first = asyncio.create_task(adm.enter())
        rest = [asyncio.create_task(adm.enter()) for _ in range(others)]
        await settle()
        adm.leave()  # hands the slot to first ...
        first.cancel()  # ... which is cancelled before it could run
        await settle()
        assert first.cancelled()
        if others:
            assert rest[0].done()
            assert rest[0].exception() is None
            assert not any(t.done() for t in rest[1:])
            assert (adm.in_flight, adm.queued) == (1, others - 1)
        else:
            assert (adm.in_flight, adm.queued) == (0, 0)

    run(scenario)


def test_cancel_at_handover_on_uvloop() -> None:
    async def scenario() -> None:
        adm = Admission(Limits(max_in_flight=1, queue=5, queue_timeout=10.0))
        assert adm.try_enter()
        first = asyncio.create_task(adm.enter())
        second = asyncio.create_task(adm.enter())
        await settle()
        adm.leave()
        first.cancel()
        await asyncio.wait_for(second, timeout=5.0)
        assert first.cancelled()
        assert (adm.in_flight, adm.queued) == (1, 0)

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()


# -- rate limit --------------------------------------------------------------------------------


def test_rate_limit_on_the_fast_path() -> None:
    async def scenario(loop: FakeTimeLoop) -> None:
        adm = Admission(Limits(max_in_flight=100, queue=0, queue_timeout=1.0, rate=2.0), loop=loop)
        assert adm.try_enter()
        assert adm.try_enter()
        with pytest.raises(Shed) as info:
            adm.try_enter()
        assert info.value.reason == "rate_limited"
        assert adm.in_flight == 2
        loop.now = 0.49
        with pytest.raises(Shed):
            await adm.enter()
        loop.now = 0.5
        await adm.enter()
        assert adm.in_flight == 3
        loop.now = 100.0  # refills only up to the burst
        assert adm.try_enter()
        assert adm.try_enter()
        with pytest.raises(Shed):
            adm.try_enter()
        assert adm.snapshot().shed_rate_limited == 3
        assert "rate=2/s" in repr(adm)

    run(scenario)


def test_rate_limit_applies_before_queueing_and_spares_shed_requests() -> None:
    async def scenario(loop: FakeTimeLoop) -> None:
        adm = Admission(Limits(max_in_flight=1, queue=1, queue_timeout=1.0, rate=0.5), loop=loop)
        assert adm.try_enter()  # burst of 1 token
        with pytest.raises(Shed) as info:
            await adm.enter()  # would queue, but there is no token
        assert info.value.reason == "rate_limited"
        loop.now = 2.0
        waiter = asyncio.create_task(adm.enter())  # takes the refilled token and queues
        await settle()
        assert adm.queued == 1
        with pytest.raises(Shed) as info:
            await adm.enter()
        assert info.value.reason == "queue_full"  # shed before the rate limit is consulted
        adm.leave()
        await settle()
        assert waiter.done()
        assert waiter.exception() is None

    run(scenario)


@pytest.mark.parametrize(
    "bad",
    [
        {"max_in_flight": 0},
        {"queue": -1},
        {"queue_timeout": 0.0},
        {"rate": 0.0},
    ],
)
def test_rejects_nonsense(bad: dict[str, Any]) -> None:
    params: dict[str, Any] = {"max_in_flight": 1, "queue": 1, "queue_timeout": 1.0}
    params.update(bad)
    with pytest.raises(ValueError, match=next(iter(bad))):
        Admission(Limits(**params))


def test_leave_without_enter_is_an_error() -> None:
    adm = Admission(Limits(max_in_flight=1, queue=1, queue_timeout=1.0))
    with pytest.raises(RuntimeError):
        adm.leave()


# -- any interleaving of arrivals, departures, cancellations and expiry ------------------------

MAX, QUEUE, TIMEOUT = 3, 4, 1.0

Op = tuple[str, int]
op_strategy = st.one_of(
    st.tuples(st.just("enter"), st.just(0)),
    st.tuples(st.just("try_enter"), st.just(0)),
    st.tuples(st.just("leave"), st.integers(0, 20)),
    st.tuples(st.just("cancel"), st.integers(0, 20)),
    st.tuples(st.just("settle"), st.just(0)),
    st.tuples(st.just("advance"), st.sampled_from([1, 4, 10])),  # tenths of a second
)


async def play(loop: FakeTimeLoop, ops: list[Op]) -> None:
    adm = Admission(Limits(max_in_flight=MAX, queue=QUEUE, queue_timeout=TIMEOUT), loop=loop)
    tasks: list[asyncio.Task[None]] = []  # in arrival order
    admitted_order: list[int] = []
    holders: list[int] = []  # clients holding a slot and not yet gone
    sync_holders = 0

    async def client(i: int) -> None:
        await adm.enter()
        admitted_order.append(i)
        holders.append(i)

    async def check() -> None:
        await settle()
        assert adm.in_flight == len(holders) + sync_holders
        assert adm.in_flight <= MAX
        assert adm.queued == sum(1 for t in tasks if not t.done())
        assert adm.queued <= QUEUE
        if adm.queued:
            assert adm.in_flight == MAX  # nobody waits while a slot is free
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                assert shed_reason(t) in ("queue_full", "queue_timeout")
        # FIFO: among clients that got a slot, earlier arrivals were admitted earlier
        # (the fast path admits at once, so arrival order is admission order here too).
        assert admitted_order == sorted(admitted_order)

    for op, arg in ops:
        if op == "enter":
            tasks.append(asyncio.create_task(client(len(tasks))))
            await asyncio.sleep(0)  # let it arrive, so arrival order is task order
        elif op == "try_enter":
            if adm.try_enter():
                sync_holders += 1
        elif op == "leave":
            if holders:
                holders.pop(arg % len(holders))
                adm.leave()
            elif sync_holders:
                sync_holders -= 1
                adm.leave()
        elif op == "cancel":
            live = [t for t in tasks if not t.done()]
            if live:
                live[arg % len(live)].cancel()
        elif op == "settle":
            await check()
        else:
            loop.now += arg / 10
    await check()
    # Everyone still holding leaves, and every queued client is let in and leaves in turn.
    while holders or sync_holders or adm.queued:
        if holders:
            holders.pop()
        else:
            assert sync_holders, "a client is queued but no slot will ever free"
            sync_holders -= 1
        adm.leave()
        await settle()
    assert (adm.in_flight, adm.queued) == (0, 0)
    assert all(t.done() for t in tasks)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(op_strategy, max_size=60))
def test_any_interleaving_never_leaks_a_slot(ops: list[Op]) -> None:
    run(functools.partial(play, ops=ops))


def test_seeded_cancel_storm() -> None:
    """Many random schedules, biased towards cancelling at the moment of handover."""
    rng = random.Random(20240611)
    for _ in range(40):
        kinds = ["enter"] * 4 + ["leave"] * 3 + ["cancel"] * 3 + ["settle", "advance"]
        ops: list[Op] = []
        for _ in range(80):
            kind = rng.choice(kinds)
            arg = rng.choice([1, 4, 10]) if kind == "advance" else rng.randrange(20)
            ops.append((kind, arg))
        run(functools.partial(play, ops=ops))


def test_retune_keeps_slots_and_queue_and_admits_waiters_a_larger_limit_allows() -> None:
    async def scenario(loop: FakeTimeLoop) -> None:
        adm = Admission(Limits(max_in_flight=1, queue=3, queue_timeout=1.0), loop=loop)
        assert adm.try_enter()
        waiters = [asyncio.create_task(adm.enter()) for _ in range(3)]
        await settle()
        # A smaller queue keeps those already queued; a larger limit admits two of them now.
        adm.retune(Limits(max_in_flight=3, queue=1, queue_timeout=2.0))
        await settle()
        assert [w.done() for w in waiters] == [True, True, False]
        assert (adm.in_flight, adm.queued) == (3, 1)
        with pytest.raises(Shed) as info:
            await adm.enter()
        assert info.value.reason == "queue_full"
        snap = adm.snapshot()
        assert (snap.max_in_flight, snap.queue, snap.queue_timeout) == (3, 1, 2.0)
        for _ in range(4):
            adm.leave()
            await settle()
        assert all(w.done() and w.exception() is None for w in waiters)
        assert (adm.in_flight, adm.queued) == (0, 0)
        # A rate set at reload applies from then on.
        adm.retune(Limits(max_in_flight=3, queue=1, queue_timeout=2.0, rate=1.0))
        assert adm.try_enter()
        with pytest.raises(Shed) as info:
            adm.try_enter()
        assert info.value.reason == "rate_limited"

    run(scenario)


def test_an_attempt_gives_back_its_slot_and_breaker_trial_once() -> None:
    """An exchange's Attempt holds the breaker trial and, once admitted, the admission slot; a
    second outcome reported for the same attempt gives nothing back twice."""
    upstream = Upstream("blue", 0, "http://127.0.0.1:1", "127.0.0.1", 1, 1)
    breaker, admission = upstream.breaker, upstream.admission
    assert breaker.acquire()
    attempt = Attempt(upstream, breaker.epoch)
    assert admission.try_enter()
    attempt.admit()
    assert (admission.in_flight, breaker.snapshot().in_flight) == (1, 1)
    attempt.settle(False)
    attempt.settle(False)
    snap = breaker.snapshot()
    assert (admission.in_flight, snap.in_flight, snap.consecutive_failures) == (0, 0, 1)
    # Shed before it was admitted: the breaker trial alone goes back, with no verdict.
    assert breaker.acquire()
    shed = Attempt(upstream, breaker.epoch)
    shed.settle(None)
    shed.settle(False)
    snap = breaker.snapshot()
    assert (admission.in_flight, snap.in_flight, snap.consecutive_failures) == (0, 0, 1)
