"""The supervisor's view of an upstream: what its workers last reported, summed."""

from __future__ import annotations

import asyncio

from proxy.logic.breaker import BreakerState
from proxy.logic.gauges import MemberGauges

OPEN, HALF_OPEN, CLOSED = BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED


def test_gauges_sum_the_members_and_take_the_most_severe_breaker() -> None:
    gauges = MemberGauges()
    assert (gauges.in_flight, gauges.queued, gauges.breaker) == (0, 0, CLOSED)
    assert gauges.report("w0", 3, 1, HALF_OPEN, {"queue_full": 2}) is CLOSED
    assert gauges.report("w1", 2, 0, OPEN, {"rate_limited": 1}) is CLOSED
    assert (gauges.in_flight, gauges.queued, gauges.breaker) == (5, 1, OPEN)
    # A later report replaces that member's gauges and adds its new sheds.
    assert gauges.report("w1", 1, 0, CLOSED, {"queue_full": 1}) is OPEN
    assert (gauges.in_flight, gauges.breaker) == (4, HALF_OPEN)
    assert gauges.shed == {"queue_full": 3, "queue_timeout": 0, "rate_limited": 1}
    gauges.forget("w0")
    assert (gauges.in_flight, gauges.queued, gauges.breaker) == (1, 0, CLOSED)
    # Sheds already counted stay counted: they are totals, as a counter's are.
    assert gauges.shed["queue_full"] == 3


async def test_until_idle_returns_when_the_last_member_holding_requests_reports_none() -> None:
    gauges = MemberGauges()
    gauges.report("w0", 1, 0, CLOSED, {})
    gauges.report("w1", 2, 0, CLOSED, {})
    waiters = [asyncio.create_task(gauges.until_idle()) for _ in range(2)]
    gauges.report("w0", 0, 0, CLOSED, {})
    await settle()
    assert not any(w.done() for w in waiters)
    # A waiter that gives up leaves the other waiting.
    waiters[0].cancel()
    gauges.report("w1", 1, 0, CLOSED, {})
    await settle()
    assert not waiters[1].done()
    # A member that is gone holds nothing any more (a killed worker).
    gauges.forget("w1")
    async with asyncio.timeout(5):
        await waiters[1]
    assert waiters[0].cancelled()
    await gauges.until_idle()  # idle already: at once


async def settle() -> None:
    """Let every callback already due run (a woken waiter's task takes a few loop passes)."""
    for _ in range(5):
        await asyncio.sleep(0)
