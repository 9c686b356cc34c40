"""Prometheus exposition: one registry per proxy, every series read from live objects at
scrape time so the data path only bumps plain integers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from proxy.control.rollout import RolloutSnapshot, RolloutState
from proxy.http.upstream import UPSTREAM_STATES
from proxy.logic.routing import POOLS

if TYPE_CHECKING:
    from collections.abc import Sized

    from proxy.http.router import Router
    from proxy.logic.observations import Observations
    from proxy.logic.routing import SplitSpreader

ROLLOUT_STATES = tuple(state.value for state in RolloutState)


class FleetView(Protocol):
    """A fleet member as its metrics read it (proxy/fleet/member.py's FleetMember)."""

    @property
    def connected(self) -> bool: ...
    @property
    def leading(self) -> bool: ...
    @property
    def members(self) -> Sized: ...
    @property
    def applied_revision(self) -> int: ...
    @property
    def fenced_writes(self) -> int: ...


class MetricsSource(Protocol):
    """What a scrape reads of a proxy (runtime.py's Proxy)."""

    @property
    def router(self) -> Router: ...
    @property
    def spreader(self) -> SplitSpreader: ...
    @property
    def observed(self) -> Observations: ...
    @property
    def fleet(self) -> FleetView | None: ...
    def rollout_snapshot(self) -> RolloutSnapshot: ...
    def access_log_dropped(self) -> int: ...


class ProxyCollector(Collector):
    """Reads the proxy's live state on every scrape."""

    def __init__(self, proxy: MetricsSource) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        proxy = self.proxy
        upstreams = proxy.router.upstreams()
        requests = CounterMetricFamily(
            "turnout_requests",
            "Requests answered, by pool, upstream and status code",
            labels=("pool", "upstream", "code"),
        )
        for u in upstreams:
            for code, count in sorted(u.codes.items()):
                requests.add_metric((u.pool, u.url, str(code)), count)
        for pool, codes in proxy.observed.unrouted.items():
            for code, count in sorted(codes.items()):
                requests.add_metric((pool, "", str(code)), count)
        yield requests

        attempts = CounterMetricFamily(
            "turnout_upstream_attempts",
            "Every attempt sent to an upstream (a retried or shielded one too), by the status"
            " it answered or what went wrong (connect_error, timeout, reset, bad_response, cut,"
            " client_gone)",
            labels=("pool", "upstream", "outcome"),
        )
        for u in upstreams:
            for outcome, count in sorted(u.attempts.items()):
                attempts.add_metric((u.pool, u.url, outcome), count)
        yield attempts

        duration = HistogramMetricFamily(
            "turnout_request_duration_seconds",
            "Time from request head to the end of the response, by pool",
            labels=("pool",),
        )
        for pool in POOLS:
            snap = proxy.observed.pool_stats[pool].duration.snapshot()
            duration.add_metric(
                (pool,),
                [(_le(bound), count) for bound, count in snap.buckets],
                snap.sum,
            )
        yield duration

        in_flight = GaugeMetricFamily(
            "turnout_upstream_in_flight",
            "Requests in flight per upstream",
            labels=("pool", "upstream"),
        )
        state = GaugeMetricFamily(
            "turnout_upstream_state",
            "1 for the state each upstream is in",
            labels=("pool", "upstream", "state"),
        )
        shed = CounterMetricFamily(
            "turnout_shed",
            "Requests refused by the proxy itself, by reason",
            labels=("pool", "upstream", "reason"),
        )
        for u in upstreams:
            in_flight.add_metric((u.pool, u.url), u.in_flight)
            current = u.state_name()
            for name in UPSTREAM_STATES:
                state.add_metric((u.pool, u.url, name), 1.0 if name == current else 0.0)
            adm = u.limits()
            shed.add_metric((u.pool, u.url, "queue_full"), adm.shed_queue_full)
            shed.add_metric((u.pool, u.url, "queue_timeout"), adm.shed_queue_timeout)
            shed.add_metric((u.pool, u.url, "rate_limited"), adm.shed_rate_limited)
        yield in_flight
        yield state
        yield shed

        split = GaugeMetricFamily(
            "turnout_split_percent",
            "Share of new requests sent to each pool",
            labels=("pool",),
        )
        green = proxy.spreader.split
        split.add_metric(("green",), green)
        split.add_metric(("blue",), 100.0 - green)
        yield split

        retries = CounterMetricFamily(
            "turnout_retries",
            "Retries by pool of the failed attempt and reason",
            labels=("pool", "reason"),
        )
        for pool in POOLS:
            for reason, count in sorted(proxy.observed.pool_stats[pool].retries.items()):
                retries.add_metric((pool, reason), count)
        yield retries

        draining = GaugeMetricFamily(
            "turnout_draining_connections",
            "Client connections being drained (closing after their request)",
            labels=("pool",),
        )
        for pool in POOLS:
            draining.add_metric(
                (pool,),
                sum(u.in_flight for u in upstreams if u.pool == pool and u.draining),
            )
        yield draining

        rollout = proxy.rollout_snapshot()
        yield GaugeMetricFamily(
            "turnout_rollout_step",
            "Index of the current rollout step (0 when idle)",
            value=rollout.step,
        )
        rstate = GaugeMetricFamily(
            "turnout_rollout_state", "1 for the rollout's current state", labels=("state",)
        )
        for name in ROLLOUT_STATES:
            rstate.add_metric((name,), 1.0 if name == rollout.state else 0.0)
        yield rstate
        timeouts = CounterMetricFamily(
            "turnout_timeouts",
            "Exchanges ended by a timeout, by phase (the timeouts setting of the same name)",
            labels=("phase",),
        )
        for phase, count in proxy.observed.timeouts.items():
            timeouts.add_metric((phase,), count)
        yield timeouts
        yield CounterMetricFamily(
            "turnout_rescued",
            "Candidate failures answered by the stable pool",
            value=proxy.observed.rescued,
        )
        yield CounterMetricFamily(
            "turnout_access_log_dropped",
            "Access log lines dropped because the log could not keep up (a stuck disk or pipe)",
            value=proxy.access_log_dropped(),
        )
        rb = proxy.observed.rollback_seconds.snapshot()
        rollback = HistogramMetricFamily(
            "turnout_rollback_seconds",
            "Time from the first failed candidate outcome to split 0",
        )
        rollback.add_metric((), [(_le(b), c) for b, c in rb.buckets], rb.sum)
        yield rollback
        yield from _fleet_metrics(proxy)


def _fleet_metrics(proxy: MetricsSource) -> Iterator[Metric]:
    """With `fleet:`: this member's link to etcd and its part in the fleet."""
    fleet = proxy.fleet
    if fleet is None:
        return
    yield GaugeMetricFamily(
        "turnout_fleet_connected", "1 while this member reaches etcd", value=fleet.connected
    )
    yield GaugeMetricFamily(
        "turnout_fleet_is_leader", "1 while this member leads the fleet", value=fleet.leading
    )
    yield GaugeMetricFamily(
        "turnout_fleet_members", "Live members of the fleet", value=len(fleet.members)
    )
    yield GaugeMetricFamily(
        "turnout_fleet_revision",
        "etcd revision of the fleet state this member applied",
        value=fleet.applied_revision,
    )
    yield CounterMetricFamily(
        "turnout_fleet_fenced_writes",
        "State writes etcd refused because this member no longer led",
        value=fleet.fenced_writes,
    )


WORKER_STATES = ("starting", "ready", "restarting", "stopping", "exited")


class WorkerView(Protocol):
    @property
    def state(self) -> str: ...

    @property
    def restarts(self) -> int: ...


class WorkerPoolView(Protocol):
    @property
    def workers(self) -> Sequence[WorkerView]: ...


class WorkerCollector(Collector):
    """With `turnout run --workers N`: the worker processes by state, and their restarts.
    Registered by the supervisor, which owns the pool."""

    def __init__(self, pool: WorkerPoolView) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        workers = self.pool.workers
        states = GaugeMetricFamily(
            "turnout_workers", "Worker processes sharing the port, by state", labels=("state",)
        )
        for name in WORKER_STATES:
            states.add_metric((name,), sum(1 for w in workers if w.state == name))
        yield states
        yield CounterMetricFamily(
            "turnout_worker_restarts",
            "Worker processes restarted after they exited",
            value=sum(w.restarts for w in workers),
        )


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class Metrics:
    """The proxy's registry and its exposition."""

    def __init__(self, proxy: MetricsSource) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ProxyCollector(proxy))

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
