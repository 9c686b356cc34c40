"""What the processes that serve an upstream hold there, as their reports say.

A leader (the supervisor) serves no request itself: an upstream's requests are admitted, queued,
shed and judged by its breaker in the members (the workers). Its `Upstream` keeps an `Admission`
and a `Breaker` only for their settings; its readouts (in flight, queued, sheds, breaker state,
a drain's wait for idle) come from a `MemberGauges` beside them, a view that the members'
reports update. Nothing on the request path reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from proxy.logic.admission import SHED_REASONS, IdleWait
from proxy.logic.breaker import BreakerState

_SEVERITY: Final = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class MemberGauges:
    """One upstream as every member last reported it: requests in flight and queued (summed),
    sheds (counted up) and breaker state (the most severe)."""

    __slots__ = ("_idle", "_members", "shed")

    def __init__(self) -> None:
        # member -> (in flight, queued, breaker state)
        self._members: dict[str, tuple[int, int, BreakerState]] = {}
        self.shed: dict[str, int] = dict.fromkeys(SHED_REASONS, 0)
        self._idle = IdleWait()

    def report(
        self,
        member: str,
        in_flight: int,
        queued: int,
        breaker: BreakerState,
        shed: Mapping[str, int],
    ) -> BreakerState:
        """A member's gauges now and its sheds since its last report; returns the state its
        breaker had before."""
        before = self._members.get(member)
        self._members[member] = (in_flight, queued, breaker)
        totals = self.shed
        for reason, count in shed.items():
            totals[reason] += count  # a reason the wire format allows (SHED_REASONS)
        self._wake_if_idle()
        return BreakerState.CLOSED if before is None else before[2]

    def forget(self, member: str) -> None:
        """A member is gone: what it held no longer counts."""
        if self._members.pop(member, None) is not None:
            self._wake_if_idle()

    @property
    def in_flight(self) -> int:
        return sum(member[0] for member in self._members.values())

    @property
    def queued(self) -> int:
        return sum(member[1] for member in self._members.values())

    @property
    def breaker(self) -> BreakerState:
        worst = BreakerState.CLOSED
        for _, _, state in self._members.values():
            if _SEVERITY[state] > _SEVERITY[worst]:
                worst = state
        return worst

    async def until_idle(self) -> None:
        """Return once no member reports a request in flight (bound it with a timeout)."""
        await self._idle.until(self._busy)

    def _busy(self) -> bool:
        return self.in_flight > 0

    def _wake_if_idle(self) -> None:
        if not self.in_flight:
            self._idle.wake()

    def __repr__(self) -> str:
        return f"<MemberGauges in_flight={self.in_flight} members={self._members}>"
