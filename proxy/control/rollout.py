"""The rollout controller: timers and I/O around the pure strategies and analysis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard

from proxy.control.changes import Change, ControlError, ProxyView
from proxy.control.events import Breach, RolloutChanged, RolloutNote, RolloutStep
from proxy.control.health import probe
from proxy.logic.analysis import ErrorTest, LatencyTest, WindowFigures
from proxy.logic.strategy import (
    STRATEGIES,
    Decision,
    StepState,
    Verdict,
    analysed_steps,
    decide_adaptive,
)

if TYPE_CHECKING:
    from proxy.config import ThresholdConfig
    from proxy.control.changes import Control
    from proxy.control.health import HealthChecker
    from proxy.http.router import Router
    from proxy.logic.observations import Observations
    from proxy.logic.routing import PoolName

TICK = 0.1
# A candidate failure asks for an evaluation this soon (not on every failure: at most one
# pending), so a broken candidate is caught well within a second.
FAILURE_EVAL_DELAY = 0.02
GATE_RECHECK = 1.0


class RolloutState(StrEnum):
    IDLE = "idle"
    PROGRESSING = "progressing"
    PAUSED = "paused"
    INSUFFICIENT_DATA = "insufficient_data"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


ACTIVE = frozenset({RolloutState.PROGRESSING, RolloutState.INSUFFICIENT_DATA})


@dataclass(frozen=True, slots=True)
class RolloutSnapshot:
    state: str
    step: int
    strategy: str


class RolloutHost(ProxyView, Protocol):
    """What the controller needs of the proxy whose rollout it drives: its clock, what it
    reads, and the Control it changes routing state through."""

    @property
    def clock(self) -> Callable[[], float]: ...
    @property
    def router(self) -> Router: ...
    @property
    def control(self) -> Control: ...
    @property
    def health(self) -> HealthChecker: ...
    @property
    def observed(self) -> Observations: ...
    def figures(self, pool: PoolName, since: float | None = None) -> WindowFigures: ...


class RolloutController:
    """Drives one rollout at a time from the stable pool to the candidate."""

    def __init__(self, proxy: RolloutHost) -> None:
        self.proxy = proxy
        self.state = RolloutState.IDLE
        self.strategy: str = proxy.config.rollout.strategy
        self.step: StepState | None = None
        self.steps: tuple[float, ...] = ()
        self.reason = "no rollout started"
        self.last_figures: dict[str, Any] = {}
        self.first_failure: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._eval_pending = False
        self._gate_ok_at = -1.0
        self._error_test: ErrorTest | None = None
        self._latency_test: LatencyTest | None = None
        # The threshold the tests were built with: a reload that brings another rebuilds them.
        self._threshold: ThresholdConfig | None = None
        self._candidate_lost = False
        self._last_note: str | None = None
        # Ticks taken so far; with `driven` the loop takes none and whoever set it calls tick()
        # (tests, with a clock of their own in the proxy: no real time passes in between).
        self.ticks = 0
        self.driven = False
        # A fleet's leader: why the outcomes it holds do not cover the fleet, or None; a
        # decision other than a breach waits (insufficient_data) while they do not.
        self.coverage: Callable[[], str | None] | None = None

    # views -------------------------------------------------------------------

    @property
    def candidate_share(self) -> float:
        split = self.proxy.spreader.split
        return split if self.proxy.candidate == "green" else 100.0 - split

    @property
    def steers_split(self) -> bool:
        """An automatic rollout in progress owns the split; an operator pauses it first."""
        return self.state in ACTIVE and self.strategy != "lazy"

    @property
    def running(self) -> bool:
        """Whether the controller's loop runs (a rollout in progress or paused)."""
        return self._task is not None and not self._task.done()

    @property
    def in_progress(self) -> bool:
        """Started and not yet ended (a paused rollout is in progress)."""
        return self.state in ACTIVE or self.state is RolloutState.PAUSED

    def snapshot(self) -> RolloutSnapshot:
        return RolloutSnapshot(
            self.state.value, self.step.index + 1 if self.step else 0, self.strategy
        )

    def status(self) -> dict[str, Any]:
        proxy = self.proxy
        since = self.step.started_at if self.step is not None else None
        return {
            "strategy": self.strategy,
            "state": self.state.value,
            "step": self.step.index + 1 if self.step else 0,
            "steps": list(self.steps or proxy.config.rollout.steps),
            "split": proxy.spreader.split,
            "candidate_share": self.candidate_share,
            "reason": self.reason,
            "windows": {p: _window_dict(proxy.figures(p, since)) for p in ("blue", "green")},
            "interval": proxy.config.rollout.interval,
            "threshold": _threshold_dict(proxy.config.rollout.threshold),
            "gate": {
                "path": proxy.config.gate_path,
                "expect_status": proxy.config.rollout.gate.expect_status,
            },
            # The last verdict's measurements, and the likelihood ratio a test must reach.
            "figures": self.last_figures,
            "evidence_limit": (
                None if self._error_test is None else 1.0 / self._error_test.test_alpha
            ),
        }

    def __repr__(self) -> str:
        return f"<RolloutController {self.strategy} {self.state.value} step={self.snapshot().step}>"

    # operator actions --------------------------------------------------------

    async def action(self, action: str, data: dict[str, Any], by: str) -> Change:
        before = {"state": self.state.value, "split": self.proxy.spreader.split}
        if action == "start":
            unknown = set(data) - {"strategy"}
            if unknown:
                raise ControlError(400, "unknown field", sorted(unknown))
            strategy = data.get("strategy", self.proxy.config.rollout.strategy)
            if strategy not in STRATEGIES:
                raise ControlError(400, "invalid strategy", f"one of {', '.join(STRATEGIES)}")
            self.start(strategy, by)
        elif data:
            raise ControlError(400, "unexpected body", f"{action} takes no fields")
        elif action == "pause":
            self._require(ACTIVE, "pause")
            self._set_state(RolloutState.PAUSED, f"paused by {by}", by)
        elif action == "resume":
            self._require({RolloutState.PAUSED}, "resume")
            if self.step is not None:
                self.step = StepState(self.step.index, self.proxy.clock(), self.step.split)
            self._set_state(RolloutState.PROGRESSING, f"resumed by {by}", by)
        elif action == "promote":
            self._require(ACTIVE | {RolloutState.PAUSED}, "promote")
            self.promote(f"promoted by {by}", by)
        elif action == "rollback":
            self._require(ACTIVE | {RolloutState.PAUSED}, "roll back")
            self.rollback(f"rolled back by {by}", by)
        elif action == "abort":
            self._require(ACTIVE | {RolloutState.PAUSED}, "abort")
            self._set_state(RolloutState.ABORTED, f"aborted by {by}; the split stays", by)
        else:
            raise ControlError(404, "unknown action", action)
        after = {"state": self.state.value, "split": self.proxy.spreader.split}
        return Change(f"rollout {action}", before, after)

    def _require(self, states: frozenset[RolloutState] | set[RolloutState], verb: str) -> None:
        if self.state not in states:
            raise ControlError(409, f"cannot {verb}", f"the rollout is {self.state.value}")

    def start(self, strategy: str, by: str) -> None:
        if self.state in ACTIVE or self.state is RolloutState.PAUSED:
            raise ControlError(409, "rollout in progress", f"the rollout is {self.state.value}")
        proxy = self.proxy
        if not proxy.router.pools[proxy.candidate]:
            raise ControlError(
                409, "no candidate", f"the candidate pool {proxy.candidate} has no upstreams"
            )
        cfg = proxy.config.rollout
        self.strategy = strategy
        self.steps = tuple(cfg.steps)
        self.step = None
        self.first_failure = None
        self.last_figures = {}
        self._gate_ok_at = -1.0
        self._candidate_lost = False
        self._new_tests()
        proxy.control.fence("")
        self._set_state(
            RolloutState.PROGRESSING,
            f"{strategy} rollout from {proxy.stable} to {proxy.candidate} started by {by}",
            by,
        )
        if self._task is None or self._task.done():
            self._task = proxy.loop.create_task(self._run())

    def _new_tests(self) -> None:
        threshold = self.proxy.config.rollout.threshold
        # The tests are stateless: a reload's new threshold judges the step in progress too.
        self._threshold = threshold
        analysed = analysed_steps(self.steps)
        self._error_test = ErrorTest(threshold.max_error_rate, alpha=0.01, steps=analysed)
        self._latency_test = LatencyTest(
            threshold.max_p99, threshold.max_p99_ratio, alpha=0.01, steps=analysed
        )

    # hot restart -------------------------------------------------------------

    def handover_state(self) -> dict[str, Any]:
        """What a successor needs to carry this rollout on."""
        step = self.step
        return {
            "state": self.state.value,
            "strategy": self.strategy,
            "steps": list(self.steps),
            "step": None if step is None else {"index": step.index, "split": step.split},
            "reason": self.reason,
        }

    def restore(
        self, state: object, *, by: str = "hot restart", source: str = "a hot restart"
    ) -> None:
        """Carry on the rollout of the process this one replaces (or of the fleet's previous
        leader). The outcomes it judged stay behind with it, so the step it was on starts
        afresh: held again for `interval` and `min_requests` before the next advance, never
        skipped."""
        if not isinstance(state, dict):
            return
        try:
            phase = RolloutState(str(state.get("state")))
        except ValueError:
            return
        strategy, steps, step = state.get("strategy"), state.get("steps"), state.get("step")
        if phase is RolloutState.IDLE or strategy not in STRATEGIES or not isinstance(steps, list):
            return
        if not steps or not all(_share(s) for s in steps):
            return
        self.strategy = strategy
        self.steps = tuple(float(s) for s in steps)
        self.step = None
        if isinstance(step, dict):
            index, share = step.get("index"), step.get("split")
            if isinstance(index, int) and 0 <= index < len(self.steps) and _share(share):
                self.step = StepState(index, self.proxy.clock(), float(share))
        self.first_failure = None
        self.last_figures = {}
        self._gate_ok_at = -1.0
        self._candidate_lost = False
        self._new_tests()
        reason = state.get("reason")
        reason = reason if isinstance(reason, str) else phase.value
        self._set_state(phase, f"{reason} (carried over by {source})", by)
        if phase is RolloutState.ROLLED_BACK:
            self._fence(reason)
        if phase in ACTIVE or phase is RolloutState.PAUSED:
            self._task = self.proxy.loop.create_task(self._run())

    def promote(self, reason: str, by: str, figures: dict[str, Any] | None = None) -> None:
        proxy = self.proxy
        self._set_share(100.0, by)
        old = proxy.stable
        proxy.control.fence("")
        proxy.control.set_stable(proxy.candidate)
        self.step = None
        self._set_state(
            RolloutState.PROMOTED,
            f"{reason}: {proxy.stable} is now stable",
            by,
            figures=figures,
            previous=old,
        )

    def rollback(self, reason: str, by: str, figures: dict[str, Any] | None = None) -> None:
        self._set_share(0.0, by)
        if self.first_failure is not None:
            self.proxy.observed.rollback_seconds.observe(time.monotonic() - self.first_failure)
        self.step = None
        self._fence(reason)
        self._set_state(RolloutState.ROLLED_BACK, reason, by, figures=figures)

    def _fence(self, reason: str) -> None:
        """A rolled-back candidate takes no failover traffic until the next rollout starts."""
        proxy = self.proxy
        candidate = proxy.candidate
        proxy.control.fence(
            f"the rollout rolled {candidate} back ({reason}); it takes no failover traffic"
            " until a rollout starts"
        )

    # data path seam ----------------------------------------------------------

    def candidate_failed(self) -> None:
        """A candidate outcome failed: remember when the first one came, evaluate soon."""
        if self.state not in ACTIVE:
            return
        if self.first_failure is None:
            # The monotonic clock itself: the loop's (uvloop) moves in whole milliseconds.
            self.first_failure = time.monotonic()
        if self.strategy == "adaptive" and not self._eval_pending and not self.driven:
            self._eval_pending = True
            self.proxy.loop.call_later(FAILURE_EVAL_DELAY, self._evaluate_soon)

    def _evaluate_soon(self) -> None:
        self._eval_pending = False
        if self.state in ACTIVE and self.step is not None:
            self._evaluate_adaptive(breach_only=True)

    # the loop ----------------------------------------------------------------

    async def _run(self) -> None:
        # While it is the controller's loop: close() lets go of it before cancelling, so a gate
        # probe that took the cancellation for its own does not keep it going.
        me = asyncio.current_task()
        while self._task is me and (self.state in ACTIVE or self.state is RolloutState.PAUSED):
            if not self.driven:
                await self.tick()
            await asyncio.sleep(TICK)

    async def tick(self) -> None:
        """One look at the rollout, as the controller's loop takes every TICK seconds: the
        gate, the analysis of the step under way (by `proxy.clock`), an advance or a breach."""
        if self.state in ACTIVE:
            if self.strategy == "adaptive":
                await self._tick_adaptive()
            elif self.strategy == "eager":
                await self._tick_eager()
            elif self.candidate_share >= 100.0:
                self.promote("the operator shifted all traffic to the candidate", "lazy")
        self.ticks += 1

    async def _tick_eager(self) -> None:
        if not await self._ready() or self.state not in ACTIVE:
            return
        self.promote("eager: every candidate upstream healthy and through the gate", "eager")

    async def _tick_adaptive(self) -> None:
        step = self.step
        if step is None:
            # The first step at or above the candidate's share now (an operator may have shifted
            # some traffic already): a rollout never lowers it, so no sticky client ever moves
            # back from the candidate to the stable pool while it advances.
            share = self.candidate_share
            first = next(i for i, at in enumerate(self.steps) if at >= share)
            if not await self._ready() or self.state not in ACTIVE or self.step is not None:
                return
            self._enter_step(first, self.steps[first])
            return
        decision = self._evaluate_adaptive()
        if self.state not in ACTIVE or self.step is not step:
            return  # a breach acted
        upstreams = self.proxy.router.pools[self.proxy.candidate]
        if not any(u.healthy and not u.draining for u in upstreams):
            # Its traffic fails over to the stable pool: hold, and judge the step afresh once
            # the candidate is back, never on what it did before it went away. (Not on an open
            # breaker: its failures are evidence the step must keep, not forget.)
            self._candidate_lost = True
            self._note(self._candidate_problem() or "the candidate takes no traffic")
            return
        if self._candidate_lost:
            self._candidate_lost = False
            self.step = StepState(step.index, self.proxy.clock(), step.split)
            self._note(f"the candidate takes traffic again: step {step.index + 1} starts afresh")
            return
        if decision is not None and decision.verdict in (Verdict.ADVANCE, Verdict.PROMOTE):
            if not await self._ready():
                return
            # The gate is awaited: an operator (pause, abort, rollback, resume) or a breach may
            # have acted meanwhile, and this decision is about a step that is no longer current.
            if self.state not in ACTIVE or self.step is not step:
                return
            self._act(decision)

    def _evaluate_adaptive(self, *, breach_only: bool = False) -> Decision | None:
        step = self.step
        if step is None or self._error_test is None:
            return None
        proxy = self.proxy
        cfg = proxy.config.rollout
        if cfg.threshold is not self._threshold:
            self._new_tests()
        candidate = proxy.figures(proxy.candidate, step.started_at)
        stable = proxy.figures(proxy.stable, step.started_at)
        decision = decide_adaptive(
            now=proxy.clock(),
            step=step,
            steps=self.steps,
            interval=cfg.interval,
            threshold=cfg.threshold,
            candidate=candidate,
            stable=stable,
            error_test=self._error_test,
            latency_test=self._latency_test,
        )
        self.last_figures = decision.figures
        if decision.verdict is Verdict.BREACH:
            self._breach(decision)
            return None
        if breach_only:
            return None
        short = self.coverage() if self.coverage is not None else None
        if decision.verdict is Verdict.INSUFFICIENT_DATA or short is not None:
            problem = self._candidate_problem() if short is None else short
            reason = decision.reason if problem is None else f"{decision.reason}; {problem}"
            if self.state is not RolloutState.INSUFFICIENT_DATA:
                self._set_state(
                    RolloutState.INSUFFICIENT_DATA, reason, "analysis", figures=decision.figures
                )
            else:
                self.reason = reason  # current figures; the state itself did not change
            return None
        if self.state is RolloutState.INSUFFICIENT_DATA:
            self._set_state(
                RolloutState.PROGRESSING, decision.reason, "analysis", figures=decision.figures
            )
        if decision.verdict is Verdict.HOLD:
            self.reason = decision.reason
            return None
        return decision

    def _act(self, decision: Decision) -> None:
        step = self.step
        assert step is not None
        if decision.verdict is Verdict.PROMOTE or decision.next_split in (None, 100.0):
            if self.candidate_share < 100.0 and step.index + 1 < len(self.steps):
                self._enter_step(step.index + 1, 100.0)
                return
            self.promote(decision.reason, "analysis", decision.figures)
            return
        self._enter_step(step.index + 1, decision.next_split)

    def _enter_step(self, index: int, share: float) -> None:
        proxy = self.proxy
        self._set_share(share, "analysis")
        self.step = StepState(index, proxy.clock(), share)
        # Each step is a fresh test; a rollback is timed from the first failure it judged.
        self.first_failure = None
        self._candidate_lost = False
        self._last_note = None
        self.reason = f"step {index + 1} of {len(self.steps)}: {share:g}% on {proxy.candidate}"
        proxy.events.publish(
            RolloutStep(
                step=index + 1,
                share=share,
                candidate=proxy.candidate,
                split=proxy.spreader.split,
                figures=self.last_figures,
            )
        )

    def _breach(self, decision: Decision) -> None:
        fallback = self.proxy.config.rollout.fallback
        self.proxy.events.publish(
            Breach(reason=decision.reason, fallback=fallback, figures=decision.figures)
        )
        if fallback == "rollback":
            self.rollback(f"breach: {decision.reason}", "analysis", decision.figures)
        else:
            self._set_state(RolloutState.PAUSED, f"breach: {decision.reason}", "analysis")

    def _candidate_problem(self) -> str | None:
        """Why the candidate pool cannot be judged or trusted now, or None. Its traffic fails
        over to the stable pool, so outcomes counted before it went away must not carry the
        rollout on: it holds until the candidate takes traffic again."""
        pool = self.proxy.candidate
        upstreams = self.proxy.router.pools[pool]
        if not any(u.available for u in upstreams):
            states = ", ".join(f"{u.key} {u.state_name()}" for u in upstreams)
            return f"no candidate upstream takes traffic ({states or f'pool {pool} is empty'})"
        down = [u.key for u in upstreams if not u.draining and not u.healthy]
        if down:
            return (
                "waiting for every candidate upstream to pass its health check: "
                f"{', '.join(down)} down"
            )
        return None

    async def _ready(self) -> bool:
        """The candidate takes traffic, every upstream of it is healthy, and the gate passes."""
        problem = self._candidate_problem()
        if problem is not None:
            self._note(problem)
            return False
        return await self._gate()

    async def _gate(self) -> bool:
        proxy = self.proxy
        now = proxy.clock()
        if now - self._gate_ok_at < GATE_RECHECK:
            return True
        gate = proxy.config.rollout.gate
        hc = proxy.config.health_check
        timeout = hc.timeout
        # With gRPC health checks the gate asks the same question: is the service SERVING.
        service = hc.service if hc.grpc else None
        expected = "SERVING" if hc.grpc else str(gate.expect_status)
        upstreams = proxy.router.pools[proxy.candidate]
        # The gate sends what the health checks send (Host, fields): the app knows them.
        asks = [(u, *proxy.health.fields_for(u)) for u in upstreams]
        results = await asyncio.gather(
            *(
                probe(
                    u.host,
                    u.port,
                    proxy.config.gate_path,
                    timeout,
                    host_header,
                    u.ssl,
                    h2=u.mux is not None,
                    grpc_service=service,
                    headers=headers,
                )
                for u, host_header, headers in asks
            )
        )
        for upstream, result in zip(upstreams, results, strict=True):
            if result.detail != expected:
                asked = f"grpc.health.v1 Check({service!r})" if hc.grpc else proxy.config.gate_path
                self._note(
                    f"gate failed on {upstream.key}: {asked} answered {result.detail}, "
                    f"expected {expected}"
                )
                return False
        self._gate_ok_at = now
        return True

    # helpers -----------------------------------------------------------------

    def _set_share(self, share: float, by: str) -> None:
        proxy = self.proxy
        green = share if proxy.candidate == "green" else 100.0 - share
        proxy.control.set_split(green, by=by)

    def _note(self, reason: str) -> None:
        # Once per change of the note: the analysis rewrites `reason` every tick meanwhile.
        self.reason = reason
        if reason != self._last_note:
            self._last_note = reason
            self.proxy.events.publish(RolloutNote(reason))

    def _set_state(
        self,
        state: RolloutState,
        reason: str,
        by: str,
        *,
        figures: dict[str, Any] | None = None,
        previous: str | None = None,
    ) -> None:
        before = self.state
        self.state = state
        self.reason = reason
        self._last_note = None
        self.proxy.events.publish(
            RolloutChanged(
                before=before.value,
                after=state.value,
                reason=reason,
                by=by,
                strategy=self.strategy,
                split=self.proxy.spreader.split,
                stable=self.proxy.stable,
                figures=figures or None,
                previous_stable=previous,
            )
        )
        self.proxy.control.changed(kept=True)

    async def stand_down(self) -> None:
        """Stop deciding (a fleet member that no longer leads): the fleet's leader decides."""
        await self.close()
        self.state = RolloutState.IDLE
        self.step = None
        self.first_failure = None

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _share(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 100


def _threshold_dict(threshold: ThresholdConfig) -> dict[str, Any]:
    return {
        "max_error_rate": threshold.max_error_rate,
        "max_p99_ms": round(threshold.max_p99 * 1000, 3),
        "max_p99_ratio": threshold.max_p99_ratio,
        "min_requests": threshold.min_requests,
    }


def _window_dict(figures: WindowFigures) -> dict[str, Any]:
    return {
        "requests": figures.requests,
        "errors": figures.errors,
        "error_rate": figures.error_rate,
        "p50_ms": None if figures.p50 is None else round(figures.p50 * 1000, 3),
        "p99_ms": None if figures.p99 is None else round(figures.p99 * 1000, 3),
    }
