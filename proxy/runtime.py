"""The proxy runtime: listeners, live routing state, the control tick, ordered shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from proxy.admin.api import FleetCommands, admin_token, build_admin_app
from proxy.admin.metrics import FleetView, Metrics
from proxy.config import Config, UpstreamConfig
from proxy.control.changes import Change, Control
from proxy.control.events import BreakerChanged, EventBus, Failover, ShuttingDown
from proxy.control.health import HealthChecker, ProbeFields
from proxy.control.rollout import RolloutController, RolloutSnapshot
from proxy.control.statefile import StateFile
from proxy.http.accesslog import AccessLog, Entry
from proxy.http.exchange import Phase
from proxy.http.h2front import H2Session
from proxy.http.h2upstream import H2Upstream
from proxy.http.router import Router
from proxy.http.server import ClientConnection
from proxy.http.serving import Serving, Settings
from proxy.http.tls import ListenerTLS, client_context, server_context
from proxy.http.upstream import Upstream, protocol_factory
from proxy.logic.admission import Admission, Limits
from proxy.logic.analysis import WindowFigures
from proxy.logic.breaker import Breaker, BreakerSettings, BreakerState
from proxy.logic.observations import Observations
from proxy.logic.retry import RetryBudget
from proxy.logic.routing import OTHER, POOLS, PoolName, SplitSpreader

if TYPE_CHECKING:
    from proxy.http.exchange import Exchange

log = logging.getLogger("turnout")

TICK = 0.5
BACKLOG = 4096
RECENT = 5.0  # seconds of outcomes in /status "recent"
# Failovers to the candidate are logged at once, then at most once per this many seconds.
FAILOVER_LOG_INTERVAL = 5.0


# The youngest generation's collection threshold while serving (CPython's default is 700).
GEN0_THRESHOLD = 20_000


def freeze_startup_heap() -> None:
    """Move everything alive after start-up (modules, config, pools: some 50,000 objects) out
    of the garbage collector's reach. A full collection walks them all and stalls the loop for
    20-50 ms, which is every request's tail latency; the hot path's own objects are freed by
    reference counting and never need a full collection.

    Then raise the youngest generation's threshold. A collection runs whenever 700 more
    objects are alive than at the previous one, and a few hundred requests in flight, each
    holding a handful, cross that several times a second under load: each collection stalls
    the loop, and moves the requests in flight to the older generations, whose collections
    take longer. At GEN0_THRESHOLD steady serving starts none (measured: 350 collections in
    8 s of 256 busy connections at 700, none at 20,000); the rare reference cycle waits
    longer to be freed."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, middle, oldest)


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket; the proxy owns it so that it can hand it to a successor."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: accepted sockets copy the proto, and asyncio's default loop
    # turns Nagle off (TCP_NODELAY) only on sockets whose proto says TCP; without it a
    # response head and body written apart wait 40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Front(Protocol):
    """What serves the clients: this process's own data path (`LocalFront`), or a supervisor's
    worker processes (proxy/procs/supervisor.py)."""

    async def start(self, sock: socket.socket) -> None:
        """Serve on `sock`, checked and bound."""

    async def stop(self, timeout: float) -> None:
        """Stop accepting; what is in flight finishes within `timeout`, the rest is cut."""

    async def closed(self) -> None:
        """Wait until the listener has let go of everything (after `stop`)."""

    def abort(self) -> None:
        """A second signal: cut what is still served, at once."""

    def reopen_logs(self) -> None: ...

    def load(self) -> dict[str, int]:
        """What it serves now: `connections`, and whatever else it counts."""
        ...

    def status(self) -> dict[str, Any]:
        """What /status adds for it."""
        ...


class FleetSeam(FleetView, FleetCommands, Protocol):
    """This process's part in a fleet (proxy/fleet/member.py's FleetMember, set by
    proxy.fleet.join): what its metrics and admin API ask of it, and the proxy itself."""

    @property
    def instance(self) -> str: ...
    def status(self) -> dict[str, Any]: ...
    def rollout_snapshot(self, local: RolloutSnapshot) -> RolloutSnapshot: ...
    def rollout_status(self, local: dict[str, Any]) -> dict[str, Any]: ...
    async def close(self) -> None: ...


class OutcomeSink(Protocol):
    """Takes the data path's upstream outcomes for the analysis (a worker's recorder)."""

    def outcome(self, pool: PoolName, error: bool, latency: float) -> None: ...


def _local_front(proxy: Proxy) -> Front:
    return LocalFront(proxy)


@dataclass(frozen=True)
class Role:
    """The part one process takes. A single Turnout does everything: the defaults. A supervisor
    of `--workers N` (proxy/procs/supervisor.py) runs control, health checks and the rollout
    over the state its workers share, and they serve the clients (`front`). A worker
    (proxy/procs/worker.py) serves the clients by its supervisor's routing state: no health
    checks, its outcomes go to the supervisor (`outcomes`), its share of the limits."""

    # Who serves the clients, made once the proxy exists.
    front: Callable[[Proxy], Front] = _local_front
    # One process of `share` that serve the same upstreams: each enforces 1/share of the
    # per-upstream limits and of listen.max_connections.
    share: int = 1
    checks_health: bool = True
    writes_access_log: bool = True
    # Called on every upstream made (from the configuration, the admin API, a reload).
    fit_upstream: Callable[[Upstream], None] | None = None
    # Where the data path's outcomes for the analysis go; None: this process's windows.
    outcomes: OutcomeSink | None = None


SINGLE = Role()


class Proxy:
    """One process of Turnout, composed by its `role`: the configuration, the routing state
    (written by `control`), health checks, the rollout controller, the observations, the admin
    API, and the `front` that serves the clients."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] | None = None,
        role: Role = SINGLE,
    ) -> None:
        self.role = role
        # The role's, read once per request (an attribute of the proxy costs less to read).
        self.outcome_sink = role.outcomes
        self.config = config
        self.config_path = config_path
        self.log = log
        self.loop = asyncio.get_running_loop()
        # The time the analysis and the rollout controller go by (the loop's, in seconds):
        # outcomes are recorded at it and steps are timed by it. Tests give a clock they move.
        self.clock: Callable[[], float] = clock or self.loop.time
        # Where the routing state is kept across restarts (`turnout run` sets it up).
        self.state_file: StateFile | None = None
        self.serving = Serving(Settings.from_config(config, role.share))
        self.rng = rng or random.Random()
        self.spreader = SplitSpreader(config.split)
        self.events = EventBus()
        self._refresh_pending = False
        self.pool_tls: dict[PoolName, ssl.SSLContext] = {}
        self.listener_tls = (
            ListenerTLS(config.listen.tls, http2=config.listen.http2) if config.listen.tls else None
        )
        self.router = Router(
            config,
            self._build_pools(config),
            self.spreader,
            self.rng,
            stable="green" if config.split == 100.0 else "blue",
        )
        self.control: Control = Control(self)
        self.health = self._health_checker(config)
        self.retry_budget = RetryBudget(config.retries.budget, config.retries.min_per_second)
        self.observed = Observations(config.rollout.interval, (phase.value for phase in Phase))
        # Requests for the stable pool that went to the candidate; the last logged count.
        self.candidate_failovers = 0
        self._failovers_logged = 0
        self._failover_logged_at = float("-inf")
        self.rollout: RolloutController = RolloutController(self)
        self.fleet: FleetSeam | None = None  # set by proxy.fleet.join
        self.access_log = self._access_log(config)
        self.access_log_dropped_before = 0  # by the access logs a reload replaced
        self.metrics = Metrics(self)
        # Requests answered (a worker reports how many since its last report).
        self.served = 0
        self.admin_runner: web.AppRunner | None = None
        self.listen_socket: socket.socket | None = None
        self.admin_socket: socket.socket | None = None
        self.admin_port = 0
        self.port = 0
        self.listen_address = ""
        self.front = role.front(self)

    # construction --------------------------------------------------------------

    def _build_pools(self, config: Config) -> dict[PoolName, tuple[Upstream, ...]]:
        return {
            name: tuple(
                self.new_upstream(name, i, u, getattr(config.pools, name).protocol)
                for i, u in enumerate(getattr(config.pools, name).upstreams)
            )
            for name in POOLS
        }

    def new_upstream(
        self, pool: PoolName, index: int, cfg: UpstreamConfig, protocol: str
    ) -> Upstream:
        """An upstream of `pool` speaking `protocol` (the pool's, in the configuration of the
        routing snapshot it is made for)."""
        upstream = Upstream(pool, index, cfg.url, cfg.host, cfg.port, cfg.weight, protocol=protocol)
        if cfg.scheme == "https":
            upstream.ssl = self.pool_context(pool)
        if protocol != "http1":
            upstream.mux = H2Upstream(upstream, self.loop, tls=upstream.ssl is not None)

        def on_transition(old: BreakerState, new: BreakerState, reason: str) -> None:
            self.request_refresh()
            if new is BreakerState.OPEN:
                # Back among the candidates (half-open) the moment open_for has passed,
                # not at the next tick.
                open_until = upstream.breaker.snapshot().open_until
                if open_until is not None:
                    self.loop.call_at(open_until, self.request_refresh)
            # Its key at the time: a reload may have moved it since.
            self.events.publish(
                BreakerChanged(
                    upstream=upstream.key,
                    url=upstream.url,
                    before=old.value,
                    after=new.value,
                    reason=reason,
                )
            )

        upstream.breaker = Breaker(
            self.breaker_settings(), clock=self.loop.time, on_transition=on_transition
        )
        upstream.admission = Admission(self.admission_settings(), loop=self.loop)
        if self.role.fit_upstream is not None:
            self.role.fit_upstream(upstream)
        return upstream

    def breaker_settings(self) -> BreakerSettings:
        """An upstream's breaker thresholds by the configuration in force."""
        b = self.config.breaker
        return BreakerSettings(
            consecutive_failures=b.consecutive_failures,
            failure_ratio=b.failure_ratio,
            min_requests=b.min_requests,
            window=b.window,
            open_for=b.open_for,
            half_open_requests=b.half_open_requests,
            max_open_for=max(b.open_for, min(60.0, 8 * b.open_for)),
        )

    def admission_settings(self) -> Limits:
        """An upstream's limits by the configuration in force. Limits are per upstream: one
        process of several that serve it enforces its share, so that the upstream sees at most
        the configured figures from all of them together."""
        limits, n = self.config.limits, self.role.share
        return Limits(
            max_in_flight=math.ceil(limits.max_in_flight / n),
            queue=math.ceil(limits.queue / n),
            queue_timeout=limits.queue_timeout,
            rate=None if limits.rate is None else limits.rate / n,
        )

    def pool_context(self, pool: PoolName) -> ssl.SSLContext:
        """The client TLS context of a pool's https:// upstreams, built on first use."""
        ctx = self.pool_tls.get(pool)
        if ctx is None:
            cfg = getattr(self.config.pools, pool)
            ctx = self.pool_tls[pool] = client_context(cfg.tls, h2=cfg.protocol == "h2")
        return ctx

    def _access_log(self, config: Config) -> AccessLog | None:
        cfg = config.access_log
        if cfg.to == "off" or cfg.sample <= 0.0 or not self.role.writes_access_log:
            return None
        return AccessLog(cfg.to, cfg.sample, self.rng)

    def _count_dropped(self, retired: AccessLog) -> None:
        self.access_log_dropped_before += retired.dropped

    def access_log_dropped(self) -> int:
        """Access log lines lost to a writer that could not keep up, since the start."""
        current = self.access_log.dropped if self.access_log is not None else 0
        return self.access_log_dropped_before + current

    def reopen_logs(self) -> None:
        """SIGUSR1: the access log file was rotated away; open it anew."""
        self.front.reopen_logs()

    def _health_checker(self, config: Config) -> HealthChecker:
        hc = config.health_check
        return HealthChecker(
            path=hc.path,
            interval=hc.interval,
            timeout=hc.timeout,
            healthy_after=hc.healthy_after,
            unhealthy_after=hc.unhealthy_after,
            on_change=self.control.health_changed,
            grpc_service=hc.service if hc.grpc else None,
            pool_fields={name: _probe_fields(config, name) for name in POOLS},
        )

    # seams for control, health and the breaker ----------------------------------

    def request_refresh(self) -> None:
        """Rebuild the candidate tuples soon (once, however many changes arrive)."""
        if not self._refresh_pending:
            self._refresh_pending = True
            self.loop.call_soon(self._refresh)

    def _refresh(self) -> None:
        self._refresh_pending = False
        self.router.refresh()

    def watch(self, upstream: Upstream, *, cold: bool = True) -> None:
        """Start health-checking an upstream; a cold one takes traffic after its first passing
        check, a warm one keeps the health it has."""
        if self.role.checks_health:
            self.health.watch(upstream, cold=cold)

    def unwatch(self, upstream: Upstream) -> None:
        if self.role.checks_health:
            self.health.unwatch(upstream)

    def reconfigure(self, config: Config, pools: dict[PoolName, tuple[Upstream, ...]]) -> None:
        """Take `config` for everything but the routing state (Control swaps that): the hot
        path's settings, the retry budget, the access log, TLS; requests in flight keep the old
        ones. Breakers and limits of `pools` take new settings in place: upstreams keep their
        live state."""
        old = self.config
        old_log = old.access_log
        self.config = config
        if config.breaker != old.breaker or config.limits != old.limits:
            breaker, admission = self.breaker_settings(), self.admission_settings()
            for ups in pools.values():
                for upstream in ups:
                    upstream.breaker.retune(breaker)
                    upstream.admission.retune(admission)
        self.serving.settings = Settings.from_config(config, self.role.share)
        if config.retries != old.retries:
            self.retry_budget = RetryBudget(config.retries.budget, config.retries.min_per_second)
        if config.access_log != old_log:
            retired = self.access_log
            if retired is not None:
                # Its thread writes what it holds and stops; the loop does not wait for it.
                closed = self.loop.run_in_executor(None, retired.close)
                closed.add_done_callback(lambda _: self._count_dropped(retired))
            self.access_log = self._access_log(config)
        self.pool_tls = {}
        for name, ups in pools.items():
            for upstream in ups:
                upstream.ssl = self.pool_context(name) if upstream.url.startswith("https") else None
        if self.listener_tls is not None and config.listen.tls is not None:
            self.listener_tls.rotate(config.listen.tls)

    # what the data path reports --------------------------------------------------

    @property
    def stable(self) -> PoolName:
        """The pool that holds the traffic; it flips at each promotion (Control.set_stable)."""
        return self.router.stable

    @property
    def settings(self) -> Settings:
        """The values the hot path reads, by the configuration in force."""
        return self.serving.settings

    @property
    def connections(self) -> set[ClientConnection]:
        return self.serving.connections

    @property
    def tunnels(self) -> set[ClientConnection]:
        return self.serving.tunnels

    @property
    def fence_reason(self) -> str:
        """Why no request fails over to the candidate ("" when they may): a rollback's."""
        return self.control.fence_reason

    def failed_over_to_candidate(self, pool: PoolName, retried: bool) -> None:
        """A request for the stable `pool` went to the candidate: `pool` had no upstream
        available, or (`retried`) none left untried. Said loudly, at once and then at most
        every FAILOVER_LOG_INTERVAL with the count since."""
        self.candidate_failovers += 1
        now = self.loop.time()
        if now < self._failover_logged_at + FAILOVER_LOG_INTERVAL:
            return
        count = self.candidate_failovers - self._failovers_logged
        self._failovers_logged = self.candidate_failovers
        self._failover_logged_at = now
        candidate = OTHER[pool]
        why = "retried after its upstreams failed" if retried else "no upstream available"
        problems = self.pool_problems(pool)
        log.warning(
            "FAILOVER to the candidate pool %s: %d request(s) for the stable pool %s since the"
            " last such line (latest: %s; %s)",
            candidate,
            count,
            pool,
            why,
            problems,
        )
        self.events.publish(
            Failover(to=candidate, pool=pool, requests=count, reason=why, upstreams=problems)
        )

    def pool_problems(self, pool: PoolName) -> str:
        """Each upstream of `pool` and its state, with the last health check of those down."""
        upstreams = self.router.pools[pool]
        if not upstreams:
            return f"pool {pool} has no upstreams"
        checks = self.health.snapshot()
        parts: list[str] = []
        for u in upstreams:
            part = f"{u.key} {u.state_name()}"
            check = checks.get(u.key)
            if not u.healthy and check is not None and check.last_detail is not None:
                part += f" ({self.health.describe(check.last_detail)})"
            parts.append(part)
        return ", ".join(parts)

    def no_upstream_detail(self, pool: PoolName, forced: bool) -> str:
        """Why a request for `pool` found no upstream to go to: the 503's detail."""
        problems = self.pool_problems(pool)
        if forced:
            header = self.config.override_header
            return f"pool {pool} forced by {header} has no available upstream: {problems}"
        other = OTHER[pool]
        if self.router.fenced == other:
            return (
                f"pool {pool} has no available upstream ({problems}), and no request fails"
                f" over to {other}: {self.fence_reason}"
            )
        return (
            f"no available upstream in pool {pool} ({problems})"
            f" nor in pool {other} ({self.pool_problems(other)})"
        )

    def record_outcome(self, pool: PoolName, error: bool, latency: float) -> None:
        sink = self.outcome_sink
        if sink is not None:
            sink.outcome(pool, error, latency)
            return
        self.observed.windows[pool].record(self.clock(), error, latency)
        if error and pool != self.stable:
            self.rollout.candidate_failed()

    def record_response(self, ex: Exchange) -> None:
        self.served += 1
        status = ex.status
        if not status:
            return
        upstream = ex.upstream
        if upstream is not None:
            codes = upstream.codes
            codes[status] = codes.get(status, 0) + 1
        else:
            unrouted = self.observed.unrouted.setdefault(ex.pool or "", {})
            unrouted[status] = unrouted.get(status, 0) + 1
        duration = time.monotonic() - ex.started
        if ex.pool is not None:
            pool = upstream.pool if upstream is not None else ex.pool
            self.observed.pool_stats[pool].duration.observe(duration)
        access = self.access_log
        if access is not None and access.wants():
            access.write(access_entry(ex, duration))

    def figures(self, pool: PoolName, since: float | None = None) -> WindowFigures:
        return self.observed.windows[pool].figures(self.clock(), since)

    def recent_figures(self) -> dict[str, Any]:
        """Each pool's outcomes over the last RECENT seconds, for watching traffic live."""
        since = self.clock() - RECENT
        figures: dict[str, Any] = {"seconds": RECENT}
        for name in POOLS:
            figures[name] = self.figures(name, since).as_dict()
        return figures

    # lifecycle -------------------------------------------------------------------

    async def checked_listener(self, sock: socket.socket | None) -> socket.socket:
        """Check every upstream once, then take the listening socket: `sock` when given (e.g.
        inherited from the process this one replaces), else one bound on listen.host:port."""
        for upstream in self.router.upstreams():
            self.watch(upstream)
        await self.health.first_round(self.config.health_check.timeout + 0.5)
        if sock is None:
            sock = bind_listener(self.config.listen.host, self.config.listen.port)
        self.listen_socket = sock
        host, self.port = sock.getsockname()[:2]
        # What the socket is bound to, not what the file says now (a reload cannot move it).
        self.listen_address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        return sock

    def start_session(self, transport: asyncio.Transport, data: bytes) -> None:
        """Serve an HTTP/2 client on `transport`, which has sent `data` so far."""
        H2Session(self, transport).start(data)

    async def start(self, sock: socket.socket | None = None) -> int:
        """Check the upstreams, then serve on the listener (the front does); returns the port."""
        await self.front.start(await self.checked_listener(sock))
        return self.port

    async def start_admin(self, sock: socket.socket | None = None) -> int:
        """Start the admin API listener; returns its port."""
        admin = self.config.admin
        app = build_admin_app(self, admin_token(self))
        if sock is None:
            sock = bind_listener(admin.host, admin.port)
        self.admin_socket = sock
        self.admin_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.admin_runner.setup()
        tls = server_context(admin.tls) if admin.tls is not None else None
        await web.SockSite(self.admin_runner, sock, ssl_context=tls).start()
        self.admin_port = sock.getsockname()[1]
        return self.admin_port

    def listening_sockets(self) -> list[socket.socket]:
        """The listeners a successor takes over: the proxy's first, then the admin API's."""
        return [s for s in (self.listen_socket, self.admin_socket) if s is not None]

    def handover_state(self) -> dict[str, Any]:
        return {"split": self.spreader.split, "stable": self.stable}

    def restore(self, state: dict[str, Any]) -> None:
        """Take over the routing state of the process this one replaces."""
        split = state.get("split")
        if isinstance(split, int | float) and 0.0 <= split <= 100.0:
            self.control.put_split(float(split))
        if state.get("stable") in POOLS:
            self.control.set_stable(state["stable"])

    @property
    def in_flight(self) -> int:
        return sum(u.in_flight for u in self.router.upstreams())

    @property
    def candidate(self) -> PoolName:
        return OTHER[self.stable]

    async def shutdown(self, timeout: float | None = None) -> None:
        """The one shutdown sequence: stop accepting, let requests in flight finish (bounded),
        then close everything, the admin API last."""
        if self.serving.shutting_down:
            return
        self.serving.shutting_down = True
        timeout = self.settings.drain_timeout if timeout is None else timeout
        load = self.front.load()
        self.events.publish(
            ShuttingDown(self.in_flight, load["connections"], workers=load.get("workers"))
        )
        if self.fleet is not None:
            await self.fleet.close()
        await self.front.stop(timeout)
        await self.rollout.close()
        await self.control.close()
        if self.state_file is not None:
            await self.state_file.close()
        await self.health.close()
        for upstream in self.router.upstreams():
            upstream.close_idle()
            for uconn in list(upstream.connections):
                uconn.close()
        await self.front.closed()
        # Event streams end here, or the admin runner would wait for them to.
        self.events.close()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
        if self.access_log is not None:
            await asyncio.to_thread(self.access_log.close)

    # views -----------------------------------------------------------------------

    def rollout_snapshot(self) -> RolloutSnapshot:
        local = self.rollout.snapshot()
        return local if self.fleet is None else self.fleet.rollout_snapshot(local)

    async def rollout_action(self, action: str, data: dict[str, Any], by: str) -> Change:
        return await self.rollout.action(action, data, by)

    def status(self) -> dict[str, Any]:
        router = self.router
        green = self.spreader.split
        checks = self.health.snapshot()
        pools: dict[str, Any] = {}
        for name in POOLS:
            upstreams = []
            for u in router.pools[name]:
                entry = _upstream_status(u)
                check = checks.get(u.key)
                detail = check.last_detail if check is not None else None
                entry["last_check"] = self.health.describe(detail) if detail is not None else None
                upstreams.append(entry)
            pools[name] = {"available": len(router.candidates[name]), "upstreams": upstreams}
        return (
            {
                "split": {"green": green, "blue": 100.0 - green},
                "stable": self.stable,
                "candidate": self.candidate,
                "config": self.config_path,
                "listen": self.listen_address or None,
                "ramp": self.control.ramp_status(),
                "pools": pools,
                "rollout": self.rollout.status(),
                "recent": self.recent_figures(),
                "connections": self.front.load()["connections"],
                "rescued": self.observed.rescued,
                "fenced": {"pool": router.fenced, "reason": self.fence_reason}
                if router.fenced
                else None,
                "state_file": self.state_file.status() if self.state_file is not None else None,
            }
            | self.fleet_status()
            | self.front.status()
        )

    def fleet_status(self) -> dict[str, Any]:
        fleet = self.fleet
        if fleet is None:
            return {}
        return {"fleet": fleet.status(), "rollout": fleet.rollout_status(self.rollout.status())}

    def __repr__(self) -> str:
        return (
            f"<Proxy port={self.port} {self.front!r} in_flight={self.in_flight} "
            f"stable={self.stable} {self.router!r}>"
        )


class LocalFront:
    """Serves the clients in this process (a single Turnout, a worker): the listener, the tick
    that expires idle and stalled connections, the drain at shutdown."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.serving = proxy.serving
        self.server: asyncio.Server | None = None
        self._tick_task: asyncio.Task[None] | None = None

    async def start(self, sock: socket.socket) -> None:
        proxy, serving = self.proxy, self.serving
        tls = proxy.listener_tls
        self.server = await proxy.loop.create_server(
            protocol_factory(lambda: ClientConnection(proxy)),
            sock=sock,
            backlog=BACKLOG,
            ssl=tls.context if tls is not None else None,
            ssl_handshake_timeout=serving.settings.request_headers_timeout if tls else None,
        )
        self._tick_task = proxy.loop.create_task(self._tick())

    async def _tick(self) -> None:
        proxy, serving = self.proxy, self.serving
        while True:
            await asyncio.sleep(TICK)
            now = proxy.loop.time()
            for conn in list(serving.connections):
                conn.expire(now)
            for session in list(serving.sessions):
                session.expire(now)
            idle_before = now - serving.settings.idle_timeout
            router = proxy.router
            refresh = False
            for upstream in router.upstreams():
                if upstream.idle:
                    upstream.close_idle(idle_before)
                # Reading the state moves an open breaker whose time is up to half-open.
                if upstream.breaker_state is BreakerState.HALF_OPEN and (
                    upstream not in router.candidates[upstream.pool]
                ):
                    refresh = True
            if refresh:
                router.refresh()

    async def stop(self, timeout: float) -> None:
        proxy, serving = self.proxy, self.serving
        loop = proxy.loop
        taking = self._stop_accepting()
        deadline = loop.time() + timeout
        while (serving.connections or serving.sessions or any(not t.done() for t in taking)) and (
            loop.time() < deadline
        ):
            now = loop.time()
            for conn in list(serving.connections):
                conn.shutdown(now)
            for session in list(serving.sessions):
                session.shutdown(now)
            await asyncio.sleep(0.05)
        for conn in list(serving.tunnels):
            conn.going_away()
        for conn in list(serving.connections):
            if conn.tunnel is None:
                conn.abort()
        for session in list(serving.sessions):
            session.abort()
        if self._tick_task is not None:
            self._tick_task.cancel()

    async def closed(self) -> None:
        if self.server is not None:
            await self.server.wait_closed()

    def abort(self) -> None:
        for conn in list(self.serving.connections):
            conn.abort()
        for tunnel in list(self.serving.tunnels):
            tunnel.abort()

    def reopen_logs(self) -> None:
        if self.proxy.access_log is not None:
            self.proxy.access_log.reopen()

    def load(self) -> dict[str, int]:
        return {"connections": len(self.serving.connections)}

    def status(self) -> dict[str, Any]:
        return {}

    def _stop_accepting(self) -> list[asyncio.Task[None]]:
        """Close the listener, taking first the connections the kernel has queued on it: one
        still queued when the last process holding the listener closes it is reset, maybe after
        its client sent a request (the other workers of a supervisor, or the successor of a hot
        restart, may hold it on). Taken, it is answered with `Connection: close`."""
        sock, server = self.proxy.listen_socket, self.server
        if server is None:
            return []
        queued: list[socket.socket] = []
        if sock is not None and sock.fileno() != -1:
            # Taken and closed in one synchronous step: no connection can join the queue
            # between the last accept and the close but those of the same instant.
            while len(queued) < BACKLOG:
                try:
                    conn, _ = sock.accept()
                except OSError:  # BlockingIOError: nothing (more) is queued
                    break
                queued.append(conn)
        server.close()
        return [self.proxy.loop.create_task(self._serve_accepted(conn)) for conn in queued]

    async def _serve_accepted(self, conn: socket.socket) -> None:
        proxy, serving = self.proxy, self.serving
        tls = proxy.listener_tls
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await proxy.loop.connect_accepted_socket(
                protocol_factory(lambda: ClientConnection(proxy)),
                conn,
                ssl=tls.context if tls is not None else None,
                ssl_handshake_timeout=serving.settings.request_headers_timeout if tls else None,
            )
        except (OSError, TimeoutError):  # the client left (or failed its TLS handshake)
            conn.close()

    def __repr__(self) -> str:
        return f"<LocalFront connections={len(self.serving.connections)}>"


def access_entry(ex: Exchange, duration: float) -> Entry:
    """The request's figures for the access log; the log's thread makes the JSON line."""
    upstream = ex.upstream
    return (
        time.time(),
        ex.client.peer_ip,
        ex.method,
        ex.head.target,
        ex.status,
        ex.body_size,
        ex.bytes_out,
        upstream.pool if upstream is not None else ex.pool,
        upstream.url if upstream is not None else None,
        ex.attempts,
        duration,
        ex.upstream_time,
        ex.note,
    )


def _probe_fields(config: Config, pool: PoolName) -> tuple[str | None, ProbeFields]:
    """What a pool's health checks send besides the request line: the Host (None: the
    upstream's host:port) and fields, the pool's own over the global ones."""
    hc = config.health_check
    own = getattr(config.pools, pool).health_check
    host = own.host if own is not None and own.host else hc.host
    fields = {name.lower(): (name, value) for name, value in hc.headers}
    if own is not None:
        fields |= {name.lower(): (name, value) for name, value in own.headers}
    return host, tuple(fields.values())


def _upstream_status(u: Upstream) -> dict[str, Any]:
    snap = u.snapshot()
    limits = u.limits()
    return {
        "index": snap.index,
        "url": snap.url,
        "weight": snap.weight,
        "state": snap.state,
        "healthy": snap.healthy,
        "draining": snap.draining,
        "drained": snap.drained,
        "breaker": snap.breaker,
        "in_flight": snap.in_flight,
        "queued": snap.queued,
        "requests": snap.requests,
        "failures": snap.failures,
        "limits": {
            "max_in_flight": limits.max_in_flight,
            "queue": limits.queue,
            "queue_timeout": limits.queue_timeout,
            "rate": limits.rate,
        },
    }
