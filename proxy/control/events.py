"""State-change events: logged, counted, kept in a short history and streamed to subscribers."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import Field, dataclass, field, fields
from typing import Any, ClassVar, Literal

log = logging.getLogger("turnout.events")

HISTORY = 256
SUBSCRIBER_QUEUE = 1024

# Every kind of event, as `GET /events` and the log name them.
EventKind = Literal[
    "breach",
    "breaker",
    "drain",
    "drained",
    "failover",
    "fleet_connected",
    "fleet_disconnected",
    "fleet_fenced",
    "fleet_leader",
    "fleet_leader_lease_expiring",
    "fleet_leading",
    "fleet_local_rollback",
    "fleet_rollout",
    "fleet_stood_down",
    "health",
    "ramp",
    "reload",
    "reload_failed",
    "rollout",
    "rollout_note",
    "rollout_step",
    "shutdown",
    "split",
    "undrain",
    "upstream_added",
    "upstream_removed",
]


class EventData:
    """What one kind of event says: each kind below is a frozen dataclass of its fields.
    Fields that default to None are left out of the event while None."""

    __slots__ = ()
    kind: ClassVar[EventKind]
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]  # set by @dataclass on each kind

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            out[f.name] = value
        return out


# the split and the rollout


@dataclass(frozen=True, slots=True)
class SplitChanged(EventData):
    kind: ClassVar[EventKind] = "split"
    before: float
    after: float
    by: str
    ramp: float | None = None  # seconds, for a step of a ramp


@dataclass(frozen=True, slots=True)
class RampStarted(EventData):
    kind: ClassVar[EventKind] = "ramp"
    start: float
    target: float
    over: float
    by: str


@dataclass(frozen=True, slots=True)
class RolloutChanged(EventData):
    kind: ClassVar[EventKind] = "rollout"
    before: str
    after: str
    reason: str
    by: str
    strategy: str
    split: float
    stable: str
    figures: dict[str, Any] | None = None
    previous_stable: str | None = None  # on a promotion


@dataclass(frozen=True, slots=True)
class RolloutStep(EventData):
    kind: ClassVar[EventKind] = "rollout_step"
    step: int
    share: float
    candidate: str
    split: float
    figures: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RolloutNote(EventData):
    kind: ClassVar[EventKind] = "rollout_note"
    reason: str


@dataclass(frozen=True, slots=True)
class Breach(EventData):
    kind: ClassVar[EventKind] = "breach"
    reason: str
    fallback: str
    figures: dict[str, Any]


# upstreams


@dataclass(frozen=True, slots=True)
class BreakerChanged(EventData):
    kind: ClassVar[EventKind] = "breaker"
    upstream: str
    url: str
    before: str
    after: str
    reason: str | None = None
    worker: str | None = None  # the worker whose breaker it is (a supervisor's view)


@dataclass(frozen=True, slots=True)
class HealthChanged(EventData):
    kind: ClassVar[EventKind] = "health"
    upstream: str
    url: str
    healthy: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Failover(EventData):
    kind: ClassVar[EventKind] = "failover"
    to: str
    pool: str
    requests: int
    reason: str
    upstreams: str


@dataclass(frozen=True, slots=True)
class Drain(EventData):
    kind: ClassVar[EventKind] = "drain"
    upstream: str
    url: str
    by: str


@dataclass(frozen=True, slots=True)
class Undrain(EventData):
    kind: ClassVar[EventKind] = "undrain"
    upstream: str
    url: str
    by: str


@dataclass(frozen=True, slots=True)
class Drained(EventData):
    kind: ClassVar[EventKind] = "drained"
    upstream: str
    url: str
    cut_requests: int


@dataclass(frozen=True, slots=True)
class UpstreamAdded(EventData):
    kind: ClassVar[EventKind] = "upstream_added"
    upstream: str
    url: str


@dataclass(frozen=True, slots=True)
class UpstreamRemoved(EventData):
    kind: ClassVar[EventKind] = "upstream_removed"
    upstream: str
    url: str


# the process


@dataclass(frozen=True, slots=True)
class Reloaded(EventData):
    kind: ClassVar[EventKind] = "reload"
    path: str
    by: str
    restart_needed: list[str]
    kept_by_rollout: dict[str, str]


@dataclass(frozen=True, slots=True)
class ReloadFailed(EventData):
    kind: ClassVar[EventKind] = "reload_failed"
    path: str
    errors: list[Any]
    by: str


@dataclass(frozen=True, slots=True)
class ShuttingDown(EventData):
    kind: ClassVar[EventKind] = "shutdown"
    in_flight: int
    connections: int
    workers: int | None = None


# the fleet


@dataclass(frozen=True, slots=True)
class FleetConnected(EventData):
    kind: ClassVar[EventKind] = "fleet_connected"
    instance: str
    after: float | None  # seconds it was cut off; None at the first connection
    override: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class FleetDisconnected(EventData):
    kind: ClassVar[EventKind] = "fleet_disconnected"
    instance: str
    reason: str


@dataclass(frozen=True, slots=True)
class FleetLeader(EventData):
    kind: ClassVar[EventKind] = "fleet_leader"
    leader: str | None
    previous: str | None
    instance: str


@dataclass(frozen=True, slots=True)
class FleetLeading(EventData):
    kind: ClassVar[EventKind] = "fleet_leading"
    instance: str
    term: int


@dataclass(frozen=True, slots=True)
class FleetLeaseExpiring(EventData):
    kind: ClassVar[EventKind] = "fleet_leader_lease_expiring"
    instance: str
    term: int


@dataclass(frozen=True, slots=True)
class FleetStoodDown(EventData):
    kind: ClassVar[EventKind] = "fleet_stood_down"
    instance: str
    reason: str


@dataclass(frozen=True, slots=True)
class FleetFenced(EventData):
    kind: ClassVar[EventKind] = "fleet_fenced"
    instance: str
    term: int
    reason: str


@dataclass(frozen=True, slots=True)
class FleetRolloutApplied(EventData):
    kind: ClassVar[EventKind] = "fleet_rollout"
    state: str
    step: int
    reason: str
    by: str


@dataclass(frozen=True, slots=True)
class FleetLocalRollback(EventData):
    kind: ClassVar[EventKind] = "fleet_local_rollback"
    instance: str
    split: float
    before: float
    fleet_split: float
    fleet_stable: str
    reason: str
    at: float  # wall clock
    fleet_revision: int
    in_force: bool


@dataclass(frozen=True, slots=True)
class Event:
    """One state change as published: its number, kind, time and what it says."""

    seq: int
    kind: EventKind
    time: float  # wall clock, for people reading it; never used for intervals
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"seq": self.seq, "kind": self.kind, "time": self.time, **self.data})


class EventBus:
    """Fan-out of events to bounded subscriber queues; a subscriber that falls behind is cut."""

    __slots__ = ("_seq", "closed", "counts", "history", "subscribers")

    def __init__(self) -> None:
        self._seq = itertools.count(1)
        self.closed = False
        self.history: deque[Event] = deque(maxlen=HISTORY)
        self.subscribers: set[asyncio.Queue[Event | None]] = set()
        self.counts: dict[str, int] = {}

    def publish(self, what: EventData) -> Event:
        kind, data = what.kind, what.as_dict()
        event = Event(next(self._seq), kind, time.time(), data)
        self.history.append(event)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        log.info("event %s %s", kind, json.dumps(data, default=str))
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                # A reader that cannot keep up must not make the proxy hold events for ever.
                self.subscribers.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)
        return event

    async def subscribe(
        self, replay: int = 0, after: int | None = None
    ) -> AsyncGenerator[Event, None]:
        """Events from now on, after the last `replay` ones or, for a reader coming back
        (SSE's Last-Event-ID), every one still held whose number is above `after`; ends if
        the reader lags."""
        if self.closed:
            return
        queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE)
        held = list(self.history)
        if after is not None:
            missed = [event for event in held if event.seq > after]
        else:
            missed = held[-replay:] if replay else []
        for event in missed[-SUBSCRIBER_QUEUE:]:
            queue.put_nowait(event)
        self.subscribers.add(queue)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                yield item
        finally:
            self.subscribers.discard(queue)

    def close(self) -> None:
        """End every subscription (at shutdown): a stream must not hold the process open."""
        self.closed = True
        for queue in list(self.subscribers):
            self.subscribers.discard(queue)
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)

    def __repr__(self) -> str:
        return f"<EventBus history={len(self.history)} subscribers={len(self.subscribers)}>"
