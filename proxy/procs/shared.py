"""One rollout state shared by several processes: the seam, its messages and both ends' logic.

A *leader* (the process with the admin API, the health checker and the rollout controller)
decides; *members* (the processes that serve clients) route by what it decides and report what
they saw. Everything crosses one seam with two directions:

- routing state, leader to members, pushed on every change (`WorkerPool.publish`): the split,
  the stable pool, the configuration and every upstream's health and drain state;
- outcomes, each member to the leader, every `REPORT_INTERVAL` (`SocketMemberLink.report`): what
  happened since its last report (per-pool outcomes with their latency bins, status codes,
  durations, retries, sheds, rescues) and the gauges it holds now (in flight, queued, breakers).

The leader adds every report into its own windows, counters and gauges, so its analysis,
rollout decisions, `/status` and `/metrics` see the sum of all members. proxy/procs/supervisor.py
implements the seam over UNIX sockets between a supervisor and its worker processes; a shared
store can implement the same two methods for a fleet of Turnout instances on many machines.
Messages are plain JSON-ready dicts (`to_wire` / `from_wire`, by one codec: proxy/procs/wire.py)
so any transport can carry them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.config import Config, ConfigError, parse_config
from proxy.logic.admission import SHED_REASONS
from proxy.logic.analysis import latency_bin
from proxy.logic.breaker import BreakerState
from proxy.logic.routing import POOLS, PoolName
from proxy.procs.wire import (
    BOOL,
    FLOAT,
    INT,
    INT_KEY,
    STR,
    WireError,
    custom,
    enum,
    list_of,
    mapping,
    one_of,
    optional,
    pair,
    pairs,
    record,
    tuple_of,
)

if TYPE_CHECKING:
    from proxy.http.upstream import Upstream
    from proxy.runtime import Proxy

# A member's outcomes reach the leader within this; with the push of routing state it bounds
# how far one member's view may lag behind another's (100 ms).
REPORT_INTERVAL = 0.05

# An upstream as both ends name it: its pool and what it is (`Upstream.ident`: protocol and
# URL); indexes move when one is removed.
UpstreamKey = tuple[PoolName, str]


def upstream_key(upstream: Upstream) -> UpstreamKey:
    return upstream.pool, upstream.ident


# messages ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpstreamRoute:
    """One upstream as members must route to it."""

    url: str
    weight: int
    healthy: bool
    draining: bool
    drained: bool


@dataclass(frozen=True, slots=True)
class RoutingState:
    """Everything a member routes by; a new `generation` at every change."""

    generation: int
    split: float
    stable: PoolName
    config: Config
    config_generation: int
    pools: Mapping[PoolName, tuple[UpstreamRoute, ...]]
    published_at: float  # the leader's monotonic clock (one machine: comparable across processes)
    fence: str = ""  # why no request fails over to the candidate ("" when they may)

    def to_wire(self, *, with_config: bool = True) -> dict[str, Any]:
        """Without the configuration for a member that holds this `config_generation`."""
        return _ROUTING_STATE.encode(self, omit=() if with_config else ("config",))

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any], previous: RoutingState | None) -> RoutingState:
        """Decode; a message without "config" keeps the configuration of `previous`."""
        held: dict[str, Config] = {}
        if "config" not in wire:
            if previous is None or previous.config_generation != wire.get("config_generation"):
                raise WireError("routing state without the configuration it refers to")
            held["config"] = previous.config
        return _ROUTING_STATE.decode(wire, "state", held=held)


def _config_to_wire(config: Config) -> Any:
    return config.model_dump(mode="json")


def _config_from_wire(wire: object) -> Config:
    try:
        return parse_config(wire)
    except ConfigError as exc:
        raise ValueError(f"not a valid configuration: {exc}") from None


_POOL = one_of(*POOLS)
_UPSTREAM_ROUTE = record(
    UpstreamRoute, url=STR, weight=INT, healthy=BOOL, draining=BOOL, drained=BOOL
)
_ROUTING_STATE = record(
    RoutingState,
    generation=INT,
    split=FLOAT,
    stable=_POOL,
    config=custom(_config_to_wire, _config_from_wire),
    config_generation=INT,
    pools=mapping(_POOL, tuple_of(_UPSTREAM_ROUTE), every=POOLS),
    published_at=FLOAT,
    fence=optional(STR),
)


@dataclass(slots=True)
class PoolOutcomes:
    """One pool's outcomes since the last report."""

    requests: int = 0
    errors: int = 0
    latency: dict[int, int] = field(default_factory=dict)  # analysis latency bin -> count
    duration: list[int] = field(default_factory=list)  # per stats.DURATION_BUCKETS bucket (+Inf)
    duration_sum: float = 0.0
    retries: dict[str, int] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return _POOL_OUTCOMES.encode(self)

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> PoolOutcomes:
        return _POOL_OUTCOMES.decode(wire, "pool")


_COUNTS = mapping(STR, INT)
_POOL_OUTCOMES = record(
    PoolOutcomes,
    requests=INT,
    errors=INT,
    latency=mapping(INT_KEY, INT),
    duration=list_of(INT),
    duration_sum=FLOAT,
    retries=_COUNTS,
)


@dataclass(slots=True)
class UpstreamOutcomes:
    """One upstream's counts since the last report, and the gauges a member holds now."""

    in_flight: int
    queued: int
    breaker: BreakerState
    requests: int = 0
    failures: int = 0
    codes: dict[int, int] = field(default_factory=dict)
    shed: dict[str, int] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return _UPSTREAM_OUTCOMES.encode(self)

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> UpstreamOutcomes:
        return _UPSTREAM_OUTCOMES.decode(wire, "upstream")


_STATUS_COUNTS = mapping(INT_KEY, INT)
_UPSTREAM_OUTCOMES = record(
    UpstreamOutcomes,
    in_flight=INT,
    queued=INT,
    breaker=enum(BreakerState),
    requests=INT,
    failures=INT,
    codes=_STATUS_COUNTS,
    shed=mapping(one_of(*SHED_REASONS), INT),
    attempts=optional(_COUNTS),
)


@dataclass(frozen=True, slots=True)
class OutcomeReport:
    """What one member saw since its previous report (counts) and holds now (gauges)."""

    member: str
    generation: int  # the routing state it routes by
    applied_at: float  # when it began to (monotonic, like RoutingState.published_at)
    served: int  # responses answered
    connections: int  # client connections open now
    rescued: int
    pools: Mapping[PoolName, PoolOutcomes]
    upstreams: Mapping[UpstreamKey, UpstreamOutcomes]
    unrouted: Mapping[str, dict[int, int]]
    timeouts: Mapping[str, int] = field(default_factory=dict)  # exchanges ended, by phase

    def to_wire(self) -> dict[str, Any]:
        return _OUTCOME_REPORT.encode(self)

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> OutcomeReport:
        return _OUTCOME_REPORT.decode(wire, "report")


_OUTCOME_REPORT = record(
    OutcomeReport,
    member=STR,
    generation=INT,
    applied_at=FLOAT,
    served=INT,
    connections=INT,
    rescued=INT,
    pools=mapping(_POOL, _POOL_OUTCOMES),
    upstreams=pairs(pair(_POOL, STR), _UPSTREAM_OUTCOMES),
    unrouted=mapping(STR, _STATUS_COUNTS),
    timeouts=optional(_COUNTS),
)


# the leader's end --------------------------------------------------------------------------


def routing_state(
    proxy: Proxy, generation: int, config_generation: int, now: float
) -> RoutingState:
    """The routing state of the leader's proxy."""
    pools = {
        name: tuple(
            UpstreamRoute(u.url, u.weight, u.healthy, u.draining, u.drained)
            for u in proxy.router.pools[name]
        )
        for name in POOLS
    }
    return RoutingState(
        generation=generation,
        split=proxy.spreader.split,
        stable=proxy.stable,
        config=proxy.config,
        config_generation=config_generation,
        pools=pools,
        published_at=now,
        fence=proxy.fence_reason,
    )


def merge_report(
    proxy: Proxy, upstreams: Mapping[UpstreamKey, Upstream], report: OutcomeReport
) -> list[tuple[Upstream, BreakerState, BreakerState]]:
    """Add a member's report into the leader's windows, counters and gauges; a candidate error
    asks the rollout controller for an evaluation, as a local one would. Returns the breaker
    transitions the report shows (upstream, before, after)."""
    now = proxy.clock()
    candidate_failed = False
    for name, outcomes in report.pools.items():
        if outcomes.requests:
            proxy.observed.windows[name].record_counts(now, outcomes.errors, outcomes.latency)
            if outcomes.errors and name != proxy.stable:
                candidate_failed = True
        stats = proxy.observed.pool_stats[name]
        histogram = stats.duration
        for i, count in enumerate(outcomes.duration[: len(histogram.counts)]):
            histogram.counts[i] += count
        histogram.sum += outcomes.duration_sum
        for reason, count in outcomes.retries.items():
            stats.retries[reason] = stats.retries.get(reason, 0) + count
    proxy.observed.rescued += report.rescued
    for phase, count in report.timeouts.items():
        if phase in proxy.observed.timeouts:
            proxy.observed.timeouts[phase] += count
    for pool, codes in report.unrouted.items():
        _add_codes(proxy.observed.unrouted.setdefault(pool, {}), codes)
    moved: list[tuple[Upstream, BreakerState, BreakerState]] = []
    for key, seen in report.upstreams.items():
        upstream = upstreams.get(key)
        if upstream is None:
            continue  # gone from the leader: nothing left to count it in
        upstream.requests += seen.requests
        upstream.failures += seen.failures
        _add_codes(upstream.codes, seen.codes)
        _add_attempts(upstream.attempts, seen.attempts)
        gauges = upstream.members
        if gauges is not None:
            before = gauges.report(
                report.member, seen.in_flight, seen.queued, seen.breaker, seen.shed
            )
            if before is not seen.breaker:
                moved.append((upstream, before, seen.breaker))
    if candidate_failed:
        proxy.rollout.candidate_failed()
    return moved


def forget_member(upstreams: Iterable[Upstream], member: str) -> None:
    """A member is gone: its gauges no longer count."""
    for upstream in upstreams:
        if upstream.members is not None:
            upstream.members.forget(member)


def _add_codes(into: dict[int, int], codes: Mapping[int, int]) -> None:
    for code, count in codes.items():
        into[code] = into.get(code, 0) + count


def _add_attempts(into: dict[str, int], attempts: Mapping[str, int]) -> None:
    for outcome, count in attempts.items():
        into[outcome] = into.get(outcome, 0) + count


# a member's end ----------------------------------------------------------------------------


class _Seen:
    """An upstream's cumulative counters as of the last report."""

    __slots__ = (
        "attempts",
        "breaker",
        "codes",
        "failures",
        "in_flight",
        "queued",
        "requests",
        "shed",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.failures = 0
        self.codes: dict[int, int] = {}
        self.attempts: dict[str, int] = {}
        self.shed = (0, 0, 0)
        self.in_flight = 0
        self.queued = 0
        self.breaker = BreakerState.CLOSED


class OutcomeRecorder:
    """A member's outcomes between two reports: the data path's analysis outcomes are counted
    here (one dict update each), every other counter is read from the proxy and diffed."""

    __slots__ = (
        "_connections",
        "_durations",
        "_pending",
        "_rescued",
        "_retries",
        "_seen",
        "_timeouts",
        "_unrouted",
        "member",
    )

    def __init__(self, member: str) -> None:
        self.member = member
        self._pending: dict[PoolName, list[Any]] = {p: [0, 0, {}] for p in POOLS}
        self._durations: dict[PoolName, tuple[list[int], float]] = {}
        self._retries: dict[PoolName, dict[str, int]] = {p: {} for p in POOLS}
        self._rescued = 0
        self._timeouts: dict[str, int] = {}
        self._unrouted: dict[str, dict[int, int]] = {}
        self._seen: dict[Upstream, _Seen] = {}
        self._connections = 0

    def outcome(self, pool: PoolName, error: bool, latency: float) -> None:
        """One upstream outcome for the analysis (hot path)."""
        pending = self._pending[pool]
        pending[0] += 1
        if error:
            pending[1] += 1
        bins: dict[int, int] = pending[2]
        index = latency_bin(latency)
        bins[index] = bins.get(index, 0) + 1

    def take(
        self,
        proxy: Proxy,
        upstreams: Iterable[Upstream],
        *,
        generation: int,
        applied_at: float,
        served: int,
        force: bool = False,
    ) -> OutcomeReport | None:
        """Everything since the previous call, or None when nothing changed (unless `force`)."""
        pools: dict[PoolName, PoolOutcomes] = {}
        for name in POOLS:
            outcomes = self._pool(proxy, name)
            if outcomes is not None:
                pools[name] = outcomes
        changed: dict[UpstreamKey, UpstreamOutcomes] = {}
        seen_now: dict[Upstream, _Seen] = {}
        for upstream in upstreams:
            seen = self._seen.get(upstream) or _Seen()
            seen_now[upstream] = seen
            outcomes_u = _upstream_delta(upstream, seen)
            if outcomes_u is not None:
                changed[upstream_key(upstream)] = outcomes_u
        self._seen = seen_now
        rescued = proxy.observed.rescued - self._rescued
        self._rescued = proxy.observed.rescued
        timeouts = {
            phase: n - self._timeouts.get(phase, 0)
            for phase, n in proxy.observed.timeouts.items()
            if n != self._timeouts.get(phase, 0)
        }
        if timeouts:
            self._timeouts = dict(proxy.observed.timeouts)
        unrouted: dict[str, dict[int, int]] = {}
        for pool, codes in proxy.observed.unrouted.items():
            before = self._unrouted.setdefault(pool, {})
            delta = {c: n - before.get(c, 0) for c, n in codes.items() if n != before.get(c, 0)}
            if delta:
                unrouted[pool] = delta
                before.update(codes)
        connections = len(proxy.connections)
        if connections != self._connections:
            self._connections = connections
            force = True
        if not (pools or changed or rescued or unrouted or timeouts or served or force):
            return None
        return OutcomeReport(
            member=self.member,
            generation=generation,
            applied_at=applied_at,
            served=served,
            connections=connections,
            rescued=rescued,
            pools=pools,
            upstreams=changed,
            unrouted=unrouted,
            timeouts=timeouts,
        )

    def _pool(self, proxy: Proxy, name: PoolName) -> PoolOutcomes | None:
        requests, errors, bins = self._pending[name]
        if requests:
            self._pending[name] = [0, 0, {}]
        stats = proxy.observed.pool_stats[name]
        counts = stats.duration.counts
        old_counts, old_sum = self._durations.get(name, ([0] * len(counts), 0.0))
        duration = [n - o for n, o in zip(counts, old_counts, strict=True)]
        self._durations[name] = (list(counts), stats.duration.sum)
        old_retries = self._retries[name]
        retries = {r: n - old_retries.get(r, 0) for r, n in stats.retries.items()}
        retries = {r: n for r, n in retries.items() if n}
        if retries:
            self._retries[name] = dict(stats.retries)
        if not (requests or retries or any(duration)):
            return None
        return PoolOutcomes(
            requests=requests,
            errors=errors,
            latency=bins,
            duration=duration,
            duration_sum=stats.duration.sum - old_sum,
            retries=retries,
        )

    def __repr__(self) -> str:
        pending = {p: v[0] for p, v in self._pending.items()}
        return f"<OutcomeRecorder {self.member} pending={pending} upstreams={len(self._seen)}>"


def _upstream_delta(upstream: Upstream, seen: _Seen) -> UpstreamOutcomes | None:
    """What changed at one upstream since `seen`, which is brought up to date."""
    adm = upstream.admission.snapshot()
    shed = (adm.shed_queue_full, adm.shed_queue_timeout, adm.shed_rate_limited)
    breaker = upstream.breaker.state
    codes = upstream.codes
    attempts = upstream.attempts
    same = (
        upstream.requests == seen.requests
        and upstream.failures == seen.failures
        and shed == seen.shed
        and adm.in_flight == seen.in_flight
        and adm.queued == seen.queued
        and breaker is seen.breaker
        and codes == seen.codes
        and attempts == seen.attempts
    )
    if same:
        return None
    delta = UpstreamOutcomes(
        in_flight=adm.in_flight,
        queued=adm.queued,
        breaker=breaker,
        requests=upstream.requests - seen.requests,
        failures=upstream.failures - seen.failures,
        codes={c: n - seen.codes.get(c, 0) for c, n in codes.items() if n != seen.codes.get(c, 0)},
        shed={r: n - o for r, n, o in zip(SHED_REASONS, shed, seen.shed, strict=True) if n != o},
        attempts={
            a: n - seen.attempts.get(a, 0)
            for a, n in attempts.items()
            if n != seen.attempts.get(a, 0)
        },
    )
    seen.requests, seen.failures, seen.shed = upstream.requests, upstream.failures, shed
    seen.in_flight, seen.queued, seen.breaker = adm.in_flight, adm.queued, breaker
    seen.codes = dict(codes)
    seen.attempts = dict(attempts)
    return delta
