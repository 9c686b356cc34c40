"""A member cut off from etcd: it keeps the split it applied and never moves toward the
candidate; with `partition_policy: local_rollback`, once cut off for 2 x lease_ttl during a
rollout, it judges the candidate on its own outcomes and rolls back locally on a breach."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from proxy.control.events import FleetLocalRollback
from proxy.control.rollout import ACTIVE
from proxy.logic.analysis import ErrorTest
from proxy.logic.strategy import analysed_steps

if TYPE_CHECKING:
    from proxy.fleet.member import FleetMember
    from proxy.fleet.state import FleetState

log = logging.getLogger("turnout.fleet")

CHECK_EVERY = 0.1


class PartitionGuard:
    """The local_rollback policy of one member."""

    __slots__ = ("_task", "member", "override")

    def __init__(self, member: FleetMember) -> None:
        self.member = member
        # The local rollback this member made while cut off, until a newer fleet state.
        self.override: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.member.config.partition_policy == "local_rollback" and self._task is None:
            self._task = self.member.loop.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def holds(self, state: FleetState) -> bool:
        """Whether a local rollback stays in force over `state`: until the fleet decides a
        split or stable pool other than the one this member rolled back from."""
        override = self.override
        return bool(
            override is not None
            and override.get("in_force")
            and (state.split, state.stable) == (override["fleet_split"], override["fleet_stable"])
        )

    def superseded(self) -> None:
        """A newer fleet decision was applied: the override no longer holds."""
        if self.override is not None and self.override.get("in_force"):
            self.override = self.override | {"in_force": False}

    async def _run(self) -> None:
        member = self.member
        proxy = member.proxy
        await asyncio.sleep(2 * member.config.lease_ttl)
        state = member.applied
        if state is None or state.rollout.state not in {s.value for s in ACTIVE}:
            return
        since = member.disconnected_since or proxy.loop.time()
        threshold = proxy.config.rollout.threshold
        test = ErrorTest(threshold.max_error_rate, steps=analysed_steps(state.rollout.steps))
        log.warning("fleet %s: cut off during a rollout: judging it locally", member.name)
        while True:
            await asyncio.sleep(CHECK_EVERY)
            candidate = proxy.figures(proxy.candidate, since)
            stable = proxy.figures(proxy.stable, since)
            verdict = test.verdict(candidate, stable)
            if verdict.outcome == "fail":
                self._roll_back(verdict.reason)
                return

    def _roll_back(self, reason: str) -> None:
        member = self.member
        proxy = member.proxy
        green = 0.0 if proxy.stable == "blue" else 100.0
        before = proxy.spreader.split
        proxy.control.apply_split_now(green, "fleet partition policy")
        applied = member.applied
        event = FleetLocalRollback(
            instance=member.instance,
            split=green,
            before=before,
            fleet_split=applied.split if applied is not None else before,
            fleet_stable=applied.stable if applied is not None else proxy.stable,
            reason=f"local rollback while cut off from etcd: {reason}",
            at=member.wall(),
            fleet_revision=member.applied_revision,
            in_force=True,
        )
        self.override = event.as_dict()
        del self.override["instance"]
        proxy.events.publish(event)

    def __repr__(self) -> str:
        return f"<PartitionGuard running={self._task is not None} override={self.override}>"
