"""A fleet member: joins the fleet in etcd, follows its state, and decides when it leads.

One member of a fleet leads: the one whose election key (under its lease) was created first.
The leader alone runs the rollout controller, on its own outcomes and those the others publish;
every state it writes is one transaction fenced on its election key's create_revision, so a
leader whose lease ran out (paused, cut off) has its write refused by etcd. It also stops
deciding on its own at the lease deadline minus a margin, on the monotonic clock; before it
decides again it proves its election key still stands by a fenced transaction.

Every member, the leader too, applies the state it reads by watch, newer revisions only: a
move toward the candidate at the state's `effective_at` (wall clock, the same instant on every
host), a move toward the stable pool at once. Split and rollout commands taken by any member
go to the leader as command keys; the taker answers once the state holds the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.config import FleetConfig
from proxy.control.changes import ControlError
from proxy.control.events import (
    FleetConnected,
    FleetDisconnected,
    FleetFenced,
    FleetLeader,
    FleetLeading,
    FleetLeaseExpiring,
    FleetRolloutApplied,
    FleetStoodDown,
)
from proxy.control.rollout import RolloutSnapshot
from proxy.fleet.commands import Commands
from proxy.fleet.outcomes import FRESH, OutcomeTap
from proxy.fleet.partition import PartitionGuard
from proxy.fleet.state import FleetRollout, FleetState, Keys, MemberRecord, StateError, leader_of
from proxy.fleet.state import toward_candidate as moves_toward_candidate
from proxy.fleet.store import (
    KV,
    Compare,
    EtcdStore,
    Op,
    Put,
    Store,
    StoreError,
    WatchBatch,
    client_tls,
)

if TYPE_CHECKING:
    from proxy.runtime import Proxy

log = logging.getLogger("turnout.fleet")

EFFECTIVE_DELAY = 0.3  # seconds between a move toward the candidate and its effective_at
APPLY_TIMEOUT = 2.0
RETRY = 0.2
REPORT_EVERY = 0.25
COVERAGE_MIN = 0.5  # share of live members whose outcomes the leader must have seen lately


@dataclass(frozen=True, slots=True)
class MemberView:
    instance: str
    admin: str
    applied_revision: int
    last_seen: float  # wall clock
    override: dict[str, Any] | None


def default_instance() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


class SessionLost(Exception):
    """The lease is gone: a new one, and a new campaign."""


class FleetMember:
    """This instance's part in a fleet (see the module docstring)."""

    def __init__(
        self,
        proxy: Proxy,
        config: FleetConfig,
        *,
        store: Store | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.config = config
        self.name = config.name
        self.instance = config.instance or default_instance()
        self.keys = Keys(config.name)
        self.ttl = max(1, round(config.lease_ttl))
        self.margin = max(0.1, self.ttl / 5)
        tls = config.tls
        self.store: Store = store or EtcdStore(
            config.etcd,
            tls=client_tls(tls.ca, tls.cert, tls.key) if tls is not None else None,
            timeout=max(0.3, self.ttl / 3),
        )
        self.wall = wall
        self.lease = 0
        self.term = 0  # create_revision of this member's election key; 0 when not campaigning
        self.lease_deadline = 0.0  # loop time
        # The term of a lead whose lease deadline passed: proven (fenced) before deciding again.
        self.suspect = 0
        self.leading = False
        self.leader: str | None = None
        self.campaigns: dict[str, int] = {}
        self.members: dict[str, MemberView] = {}
        self.state: FleetState | None = None  # the newest state read
        self.revision = 0  # its mod_revision
        self.applied: FleetState | None = None
        self.applied_revision = 0
        self.fenced_writes = 0
        self.disconnected_since: float | None = None
        self._decided: float | None = None
        self._written: tuple[Any, ...] | None = None
        self._write_lock = asyncio.Lock()
        self._pending_apply: asyncio.TimerHandle | None = None
        self._applied_event = asyncio.Event()
        self._guard: asyncio.TimerHandle | None = None
        self._wake_lead = asyncio.Event()
        self._member_dirty = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._main: asyncio.Task[None] | None = None
        self._watching = False
        self.tap = OutcomeTap(proxy)
        self.commands = Commands(self)
        self.partition = PartitionGuard(self)

    # lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self.proxy.control.coordinator = self
        # Every change of the stable pool or the rollout may change the state a leader writes.
        self.proxy.control.listeners.append(self._wake_lead.set)
        self._main = self.loop.create_task(self._run())

    async def close(self) -> None:
        """Leave the fleet: revoking the lease hands the lead over at once."""
        tasks = [t for t in (self._main, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.partition.stop()
        if self._guard is not None:
            self._guard.cancel()
        if self._pending_apply is not None:
            self._pending_apply.cancel()
        if self.lease:
            with contextlib.suppress(StoreError):  # else it expires by itself
                await self.store.revoke(self.lease)
        await self.store.close()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("fleet task failed", exc_info=task.exception())

    @property
    def connected(self) -> bool:
        """Whether this member holds a live lease (renewed within its deadline)."""
        return self.lease != 0 and self.disconnected_since is None

    # the session: lease, campaign, keep-alive ----------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._session()
            except StoreError as exc:
                self._set_disconnected(str(exc))
            except SessionLost as exc:
                log.warning("fleet %s: %s; joining anew", self.name, exc)
            self._lose_session()
            await asyncio.sleep(RETRY)

    async def _session(self) -> None:
        sent = self.loop.time()
        self.lease = await self.store.grant(self.ttl)
        self._renewed(sent, self.ttl)
        if not self._watching:
            kvs, revision = await self.store.get(self.keys.root, prefix=True)
            self._load(kvs)
            self._watching = True
            self.spawn(self._watch(revision + 1))
            self.spawn(self._publish_members())
            self.spawn(self._report())
        self._member_dirty.set()
        while True:
            try:
                await self._renew()
            except StoreError as exc:
                # Tried again until the lease deadline; the guard acts on the deadline.
                log.debug("fleet %s: %s", self.name, exc)
                await asyncio.sleep(RETRY)
                continue
            await asyncio.sleep(self.ttl / 3)

    async def _renew(self) -> None:
        if self.suspect:
            await self._prove()
        sent = self.loop.time()
        ttl = await self.store.keepalive(self.lease)
        if ttl <= 0:
            raise SessionLost("the lease expired")
        self._renewed(sent, ttl)
        if self.term == 0:
            await self._campaign()

    def _renewed(self, sent: float, ttl: int) -> None:
        self.lease_deadline = sent + ttl
        if self._guard is not None:
            self._guard.cancel()
        self._guard = self.loop.call_at(self.lease_deadline - self.margin, self._lease_expiring)
        if self.disconnected_since is not None:
            self._set_connected()
            self._reconsider()

    def _lease_expiring(self) -> None:
        """No renewal reached etcd in time: stop deciding before the lease can run out."""
        self._set_disconnected("no lease renewal within the lease")
        if self.leading:
            self.suspect = self.term
            self.proxy.events.publish(FleetLeaseExpiring(self.instance, self.term))
            self._stand_down("its lease is about to run out")

    async def _campaign(self) -> None:
        """Put this member's election key under its lease unless it exists (etcd's recipe)."""
        key = self.keys.election + self.instance
        result = await self.store.txn(
            [Compare(key, 0)], [Put(key, self.instance.encode(), self.lease)]
        )
        if result.succeeded:
            self.term = result.revision
        else:
            mine = [kv for kv in result.found if kv.lease == self.lease]
            if mine:
                self.term = mine[0].create_revision
            else:
                return  # a previous incarnation's key: it goes with its lease
        self.campaigns[self.instance] = self.term
        self._reconsider()

    async def _prove(self) -> None:
        """After the lease deadline passed while leading: a fenced transaction says whether
        the election key still stands (the lease survived) before deciding again."""
        result = await self.store.txn(
            [Compare(self.keys.election + self.instance, self.suspect)], [], read_on_failure=False
        )
        self.suspect = 0
        if not result.succeeded:
            self._fenced("its election key is gone")
            raise SessionLost("fenced")
        self._reconsider()

    def _lose_session(self) -> None:
        if self.leading:
            self._stand_down("the session ended")
        if self.term:
            self.campaigns.pop(self.instance, None)
        self.term = 0
        self.lease = 0
        self.suspect = 0

    def _set_disconnected(self, why: str) -> None:
        if self.disconnected_since is None:
            self.disconnected_since = self.loop.time()
            self.proxy.events.publish(FleetDisconnected(self.instance, why))
            self.partition.start()

    def _set_connected(self) -> None:
        since = self.disconnected_since
        self.disconnected_since = None
        self.partition.stop()
        override = self.partition.override
        self.proxy.events.publish(
            FleetConnected(
                instance=self.instance,
                after=None if since is None else round(self.loop.time() - since, 3),
                override=override,
            )
        )
        self._member_dirty.set()

    # reading the fleet ---------------------------------------------------------

    def _load(self, kvs: list[KV]) -> None:
        self.campaigns = {}
        self.members = {}
        for kv in kvs:
            self._on_put(kv)
        self._reconsider()

    async def _watch(self, start: int) -> None:
        async for batch in self.store.watch(self.keys.root, prefix=True, start_revision=start):
            self._on_batch(batch)

    def _on_batch(self, batch: WatchBatch) -> None:
        if batch.snapshot is not None:
            self._load(list(batch.snapshot))
            return
        for event in batch.events:
            if event.kind == "put":
                self._on_put(event.kv)
            else:
                self._on_delete(event.kv)
        self._reconsider()

    def _on_put(self, kv: KV) -> None:
        kind, name = self.keys.kind(kv.key)
        if kind == "state":
            self._on_state(kv)
        elif kind == "election":
            self.campaigns[name] = kv.create_revision
        elif kind == "members":
            try:
                record = MemberRecord.decode(kv.value)
            except StateError as exc:
                log.warning("fleet: %s", exc)
                return
            self.members[name] = MemberView(
                name, record.admin, record.applied_revision, self.wall(), record.override
            )
        elif kind == "commands" and self.leading:
            self.commands.take(kv)
        elif kind == "results":
            self.commands.answered(name, kv)
        elif kind == "outcomes" and self.leading and name != self.instance:
            self.tap.merge(name, kv.value, self.wall())

    def _on_delete(self, kv: KV) -> None:
        kind, name = self.keys.kind(kv.key)
        if kind == "election":
            self.campaigns.pop(name, None)
            if name == self.instance:
                self.term = 0  # the lease ran out; the session finds out and campaigns anew
        elif kind == "members":
            self.members.pop(name, None)
        elif kind == "commands":
            self.commands.gone(kv.key)
        elif kind == "outcomes":
            self.tap.forget(name)

    def _reconsider(self) -> None:
        leader = leader_of(self.campaigns)
        if leader != self.leader:
            previous, self.leader = self.leader, leader
            self.proxy.events.publish(
                FleetLeader(leader=leader, previous=previous, instance=self.instance)
            )
        should_lead = (
            leader == self.instance
            and self.term != 0
            and self.campaigns.get(self.instance) == self.term
            and not self.suspect
            and self.disconnected_since is None
        )
        if should_lead and not self.leading:
            self._lead()
        elif self.leading and not should_lead:
            self._stand_down("another member leads")

    # following the state -------------------------------------------------------

    def _on_state(self, kv: KV) -> None:
        if kv.mod_revision <= self.revision:
            return
        try:
            state = FleetState.decode(kv.value)
        except StateError as exc:
            log.error("fleet: ignoring revision %d: %s", kv.mod_revision, exc)
            return
        self.state, self.revision = state, kv.mod_revision
        if self._pending_apply is not None:
            self._pending_apply.cancel()
            self._pending_apply = None
        # The direction is judged against the fleet state applied last, not the proxy's own
        # pool flags: a leader flips its stable pool at a promotion before the split follows.
        proxy = self.proxy
        applied = self.applied
        split, stable = (
            (applied.split, applied.stable)
            if applied is not None
            else (proxy.spreader.split, proxy.stable)
        )
        delay = state.effective_at - self.wall()
        if delay > 0 and moves_toward_candidate(split, stable, state.split):
            self._pending_apply = self.loop.call_later(delay, self._apply, state, kv.mod_revision)
        else:
            self._apply(state, kv.mod_revision)

    def _apply(self, state: FleetState, revision: int) -> None:
        self._pending_apply = None
        proxy = self.proxy
        if not self.partition.holds(state):
            self.partition.superseded()
            if proxy.stable != state.stable:
                proxy.control.set_stable(state.stable)
            if proxy.spreader.split != state.split:
                proxy.control.apply_split_now(state.split, f"fleet ({state.writer})")
        previous = self.applied
        self.applied, self.applied_revision = state, revision
        r = state.rollout
        if not self.leading and (
            previous is None or (previous.rollout.state, previous.rollout.step) != (r.state, r.step)
        ):
            # The leader's rollout events, as each member sees them take effect.
            proxy.events.publish(
                FleetRolloutApplied(state=r.state, step=r.step, reason=r.reason, by=state.writer)
            )
            # As the leader's controller does: a rolled-back candidate takes no failover
            # traffic until a rollout starts (or a promotion) lifts the fence.
            if r.state == "rolled_back":
                proxy.control.fence(f"the fleet rolled {proxy.candidate} back ({r.reason})")
            elif proxy.router.fenced is not None:
                proxy.control.fence("")
        self._applied_event.set()
        self._applied_event = asyncio.Event()
        self._member_dirty.set()

    async def until_applied(self, revision: int) -> None:
        deadline = self.loop.time() + APPLY_TIMEOUT
        while self.applied_revision < revision:
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise ControlError(
                    503,
                    "fleet state not applied",
                    f"revision {revision} not applied here within {APPLY_TIMEOUT:g}s",
                )
            try:
                async with asyncio.timeout(remaining):
                    await self._applied_event.wait()
            except TimeoutError:
                continue

    # leading -------------------------------------------------------------------

    def _lead(self) -> None:
        self.leading = True
        self.proxy.events.publish(FleetLeading(self.instance, self.term))
        state = self.applied or self.state
        self._decided = state.split if state is not None else None
        self._written = self._key(state) if state is not None else None
        self.tap.restart()
        self.proxy.rollout.coverage = self._coverage_problem
        self.spawn(self.commands.take_pending())
        if state is not None and state.rollout.state != "idle":
            # Under way: carried on, the step held afresh. Ended: kept for /status.
            rollout = state.rollout
            self.proxy.rollout.restore(
                {
                    "state": rollout.state,
                    "strategy": rollout.strategy,
                    "steps": list(rollout.steps),
                    "step": None
                    if rollout.step == 0 or rollout.step_split is None
                    else {"index": rollout.step - 1, "split": rollout.step_split},
                    "reason": rollout.reason,
                },
                by=f"fleet leader {self.instance}",
                source=f"the fleet's new leader {self.instance}",
            )
        self.spawn(self._lead_loop())

    def _stand_down(self, why: str) -> None:
        if not self.leading:
            return
        self.leading = False
        self._decided = None
        self._wake_lead.set()
        self.tap.restart()
        self.proxy.rollout.coverage = None
        # A ramp this member was walking stops where it got; the fleet's leader decides now.
        self.proxy.control.stop_ramp()
        self.proxy.events.publish(FleetStoodDown(self.instance, why))
        self.spawn(self.proxy.rollout.stand_down())

    def split_decided(self, green: float, by: str) -> None:
        """The control layer's split decision (the SplitCoordinator seam)."""
        if self.leading:
            self._decided = green
            self._wake_lead.set()
        else:
            log.warning(
                "fleet %s: split %g by %s not applied: the fleet's leader decides the split",
                self.name,
                green,
                by,
            )

    def _desired(self) -> FleetState:
        proxy = self.proxy
        rollout = proxy.rollout
        step = rollout.step
        split = self._decided if self._decided is not None else proxy.spreader.split
        return FleetState(
            split=split,
            stable=proxy.stable,
            rollout=FleetRollout(
                state=rollout.state.value,
                strategy=rollout.strategy,
                step=step.index + 1 if step is not None else 0,
                step_split=step.split if step is not None else None,
                steps=tuple(rollout.steps),
                reason=rollout.reason,
            ),
            writer=self.instance,
            term=self.term,
        )

    @staticmethod
    def _key(state: FleetState) -> tuple[Any, ...]:
        r = state.rollout
        return (state.split, state.stable, r.state, r.strategy, r.step, r.step_split, r.steps)

    async def _lead_loop(self) -> None:
        """Write the leader's state each time it may have changed: the control layer's changes
        and split decisions wake this loop (cleared before the write, so that a change made
        while it is under way is written next); a write etcd did not take is tried again."""
        while self.leading:
            self._wake_lead.clear()
            try:
                await self.write_state()
            except StoreError as exc:
                log.warning("fleet %s: state write failed: %s", self.name, exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RETRY):
                        await self._wake_lead.wait()
                continue
            await self._wake_lead.wait()

    async def write_state(self, extra: tuple[Op, ...] = ()) -> tuple[bool, int]:
        """Write the leader's state if it changed (and `extra`), fenced on the election key.
        Returns whether the state was written and the revision of the write."""
        async with self._write_lock:
            if not self.leading:
                raise ControlError(503, "no fleet leader", "this member stopped leading")
            desired = self._desired()
            key = self._key(desired)
            changed = key != self._written
            if not changed and not extra:
                return False, self.revision
            ops: list[Op] = list(extra)
            if changed:
                current = self.state
                toward = current is not None and moves_toward_candidate(
                    current.split, current.stable, desired.split
                )
                now = self.wall()
                desired = FleetState(
                    desired.split,
                    desired.stable,
                    desired.rollout,
                    effective_at=now + EFFECTIVE_DELAY if toward else now,
                    writer=desired.writer,
                    term=desired.term,
                )
                ops.insert(0, Put(self.keys.state, desired.encode()))
            result = await self.store.txn(
                [Compare(self.keys.election + self.instance, self.term)], ops, read_on_failure=False
            )
            if not result.succeeded:
                self._fenced("a state write was refused")
                raise ControlError(503, "no fleet leader", "this member's lead ended")
            if changed:
                self._written = key
            return changed, result.revision

    def _fenced(self, why: str) -> None:
        self.fenced_writes += 1
        log.warning("fleet %s: %s: etcd refused the write (fenced)", self.name, why)
        self.proxy.events.publish(FleetFenced(self.instance, self.term, why))
        self.term = 0
        self.campaigns.pop(self.instance, None)
        self._stand_down(why)

    # commands ------------------------------------------------------------------

    async def command(self, kind: str, data: dict[str, Any], by: str) -> dict[str, Any]:
        """A split or rollout command taken by this member, applied fleet-wide (commands.py)."""
        return await self.commands.request(kind, data, by)

    def state_pending(self) -> bool:
        """Whether the leader's state differs from what it last wrote."""
        return self._key(self._desired()) != self._written

    # what this member says about itself ----------------------------------------

    async def _publish_members(self) -> None:
        """This member's record: at once when it changes, else once per lease period (so its
        age in /status says how lately it was heard from)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.ttl):
                    await self._member_dirty.wait()
            self._member_dirty.clear()
            if not self.lease:
                continue
            record = MemberRecord(
                instance=self.instance,
                admin=f"http://{self.proxy.config.admin.host}:{self.proxy.admin_port}",
                applied_revision=self.applied_revision,
                override=self.partition.override,
            )
            try:
                await self.store.put(
                    self.keys.members + self.instance, record.encode(), lease=self.lease
                )
            except StoreError:
                self._member_dirty.set()
                await asyncio.sleep(RETRY)

    async def _report(self) -> None:
        """Publish this member's outcomes every quarter second (the leader has its own)."""
        while True:
            await asyncio.sleep(REPORT_EVERY)
            wire = self.tap.take(counting=not self.leading)
            if not self.lease or wire is None:
                continue
            # A report that does not get through is carried by the next (totals); meanwhile
            # the leader sees less coverage.
            with contextlib.suppress(StoreError):
                await self.store.put(self.keys.outcomes + self.instance, wire, lease=self.lease)

    # views ---------------------------------------------------------------------

    def coverage(self) -> float | None:
        """Share of live members whose outcomes the leader saw lately (itself included)."""
        if not self.leading:
            return None
        live = set(self.members) | {self.instance}
        reported = self.tap.reporting(self.wall()) & live
        return round((len(reported) + (self.instance not in reported)) / len(live), 3)

    def _coverage_problem(self) -> str | None:
        share = self.coverage()
        if share is None or share >= COVERAGE_MIN:
            return None
        return (
            f"fleet coverage {share:.0%}: fewer than {COVERAGE_MIN:.0%} of the live members "
            f"reported outcomes within {FRESH:g}s"
        )

    def status(self) -> dict[str, Any]:
        now = self.wall()
        return {
            "name": self.name,
            "instance": self.instance,
            "leader": self.leader,
            "leading": self.leading,
            "connected": self.connected,
            "revision": self.applied_revision,
            "state_revision": self.revision,
            "fenced_writes": self.fenced_writes,
            "coverage": self.coverage(),
            "partition_policy": self.config.partition_policy,
            "override": self.partition.override,
            "members": [
                {
                    "instance": m.instance,
                    "applied_revision": m.applied_revision,
                    "admin": m.admin,
                    "last_seen": round(now - m.last_seen, 3),
                    "lag": max(0, self.revision - m.applied_revision),
                    "override": m.override,
                }
                for m in sorted(self.members.values(), key=lambda m: m.instance)
            ],
        }

    def rollout_snapshot(self, local: RolloutSnapshot) -> RolloutSnapshot:
        """The rollout as metrics show it: the leader's own, else the fleet's last state."""
        applied = self.applied
        if self.leading or applied is None or self.partition.override is not None:
            return local
        r = applied.rollout
        return RolloutSnapshot(r.state, r.step, r.strategy)

    def rollout_status(self, local: dict[str, Any]) -> dict[str, Any]:
        """The rollout as /status shows it: the leader's own, else the fleet's last state."""
        applied = self.applied
        if self.leading or applied is None or self.partition.override is not None:
            return local
        r = applied.rollout
        return local | {
            "strategy": r.strategy,
            "state": r.state,
            "step": r.step,
            "steps": list(r.steps) or local.get("steps", []),
            "reason": r.reason,
        }

    def __repr__(self) -> str:
        role = "leader" if self.leading else f"follower of {self.leader}"
        return (
            f"<FleetMember {self.name}/{self.instance} {role} term={self.term} "
            f"applied={self.applied_revision} fenced={self.fenced_writes}>"
        )
