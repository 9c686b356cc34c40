"""State-change events: logged, counted, kept in a short history and streamed to subscribers."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Literal

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


@dataclass(frozen=True, slots=True)
class Event:
    """One state change: its kind (`split`, `drain`, `reload`, `breaker`, ...) and figures."""

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

    def publish(self, kind: EventKind, **data: Any) -> Event:
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
