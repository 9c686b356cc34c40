"""The single writer of routing state: split and ramps, the stable pool, the fence, health,
drains, upstreams, reload. After each change it tells its listeners once (`changed`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard

from pydantic import ValidationError

from proxy.config import Config, ConfigError, UpstreamConfig, load_config, validation_problems
from proxy.control.events import (
    Drain,
    Drained,
    HealthChanged,
    RampStarted,
    Reloaded,
    ReloadFailed,
    SplitChanged,
    Undrain,
    UpstreamAdded,
    UpstreamRemoved,
)
from proxy.control.health import probe
from proxy.http.accesslog import log_problems
from proxy.http.router import Router
from proxy.http.tls import TLSSetupError, client_context, tls_problems
from proxy.http.upstream import Upstream, upstream_ident
from proxy.logic.routing import OTHER, POOLS, PoolName

if TYPE_CHECKING:
    import random

    from proxy.control.events import EventBus
    from proxy.control.rollout import RolloutController
    from proxy.control.statefile import StateFile
    from proxy.http.exchange import Exchange
    from proxy.http.server import ClientConnection
    from proxy.http.serving import Settings
    from proxy.logic.routing import SplitSpreader

# An upstream endpoint of a configuration: pool, host, port.
Endpoint = tuple[PoolName, str, int]

RAMP_TICK = 0.1


class ControlError(Exception):
    """A request the control layer refuses; `status` is the HTTP status the admin API uses."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail


log = logging.getLogger("turnout.control")


class SplitCoordinator(Protocol):
    """Takes the split decisions of a fleet member (proxy/fleet): the fleet applies them."""

    def split_decided(self, green: float, by: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Change:
    """What a mutation did, for the audit log and the admin API's answer."""

    what: str
    before: Any
    after: Any


class ProxyView(Protocol):
    """What the control layer reads of the proxy it serves (runtime.py's Proxy)."""

    @property
    def config(self) -> Config: ...
    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def events(self) -> EventBus: ...
    @property
    def spreader(self) -> SplitSpreader: ...
    @property
    def stable(self) -> PoolName: ...
    @property
    def candidate(self) -> PoolName: ...


class ControlHost(ProxyView, Protocol):
    """What Control needs of the proxy whose routing state it writes."""

    router: Router  # written here only

    @property
    def config_path(self) -> str | None: ...
    @property
    def rng(self) -> random.Random: ...
    @property
    def fence_reason(self) -> str: ...
    @property
    def settings(self) -> Settings: ...
    @property
    def tunnels(self) -> set[ClientConnection]: ...
    @property
    def state_file(self) -> StateFile | None: ...
    @property
    def rollout(self) -> RolloutController: ...
    def new_upstream(
        self, pool: PoolName, index: int, cfg: UpstreamConfig, protocol: str
    ) -> Upstream: ...
    def watch(self, upstream: Upstream, *, cold: bool = True) -> None: ...
    def unwatch(self, upstream: Upstream) -> None: ...
    def reconfigure(self, config: Config, pools: dict[PoolName, tuple[Upstream, ...]]) -> None: ...


class Control:
    """Every change to routing state goes through here, one synchronous step at a time."""

    def __init__(self, proxy: ControlHost) -> None:
        self.proxy = proxy
        self.events = proxy.events
        self._ramp: asyncio.Task[None] | None = None
        self._ramp_target: float | None = None
        # When the ramp in progress reaches its target (loop time) and who asked: a successor
        # taking over by hot restart carries the ramp on from there.
        self._ramp_ends = 0.0
        self._ramp_by = ""
        self._drains: dict[Upstream, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # The listeners and health checks are set up once, from the configuration the
        # process started with: a reload is compared with that, not with the last reload.
        self._running = proxy.config
        # In a fleet the split is the fleet's: decisions go to the coordinator, which applies
        # them here (apply_split_now) when the fleet's state says so.
        self.coordinator: SplitCoordinator | None = None
        # Why no request fails over to the candidate ("" when they may): a rollback's reason.
        self.fence_reason = ""
        # Told after every change of what routes a request (a supervisor then tells its
        # workers); the state file is told too.
        self.listeners: list[Callable[[], None]] = []

    def changed(self, *, kept: bool = False) -> None:
        """Said once after every change of what routes a request or of the rollout: the split,
        the stable pool, the fence, the configuration, an upstream's health, drain, weight or
        URL. `kept`: of what the state file keeps (the split, the stable pool, the rollout),
        which it then writes."""
        state_file = self.proxy.state_file
        if kept and state_file is not None:
            state_file.changed()
        for listener in self.listeners:
            listener()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A background task that is kept referenced until it ends, and cancelled at close."""
        task = self.proxy.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # split -----------------------------------------------------------------

    @property
    def split(self) -> float:
        return self.proxy.spreader.split

    def set_split(self, green: float, over: float | None = None, *, by: str = "operator") -> Change:
        if not 0.0 <= green <= 100.0:
            raise ControlError(400, "split out of range", "green must be within 0..100")
        if over is not None and over < 0:
            raise ControlError(400, "invalid ramp", "over must not be negative")
        before = self.split
        self._cancel_ramp()
        if over:
            self._ramp_target = green
            self._ramp_ends = self.proxy.loop.time() + over
            self._ramp_by = by
            self._ramp = self.proxy.loop.create_task(self._run_ramp(before, green, over, by))
            self.events.publish(RampStarted(start=before, target=green, over=over, by=by))
        else:
            self._apply_split(green, by)
        return Change("split", {"green": before}, {"green": green, "over": over})

    def _apply_split(self, green: float, by: str) -> None:
        if self.coordinator is not None:
            self.coordinator.split_decided(green, by)
        else:
            self.apply_split_now(green, by)

    def _steer(self, green: float, by: str) -> None:
        """One step of a ramp."""
        if self.coordinator is not None:
            self.coordinator.split_decided(green, by)
        else:
            self.put_split(green)

    def put_split(self, green: float) -> None:
        """Route `green` percent to green from now on, as a step (no event): a ramp's, or the
        state a predecessor or the state file kept."""
        self.proxy.spreader.set_split(green)
        self.changed(kept=True)

    def apply_split_now(self, green: float, by: str) -> None:
        """Route `green` percent to green from now on."""
        before = self.split
        self.put_split(green)
        if before != green:
            self.events.publish(SplitChanged(before=before, after=green, by=by))
            if green == 0.0:
                self._drain_pool_connections("green")
            elif green == 100.0:
                self._drain_pool_connections("blue")

    # the stable pool, the fence, health ---------------------------------------

    def set_stable(self, pool: PoolName) -> None:
        """`pool` holds the traffic from now on (a promotion flips it)."""
        if self.proxy.router.stable != pool:
            self.proxy.router.stable = pool
            self.changed(kept=True)

    def fence(self, reason: str) -> None:
        """From now on no request fails over to the candidate pool, because of `reason` (a
        rollback's); an empty reason lifts the fence (a new rollout, a promotion)."""
        router = self.proxy.router
        self.fence_reason = reason
        router.fenced = OTHER[router.stable] if reason else None
        self.changed(kept=True)

    def health_changed(self, upstream: Upstream, healthy: bool, reason: str) -> None:
        """The health checks took `upstream` into rotation or out of it."""
        self.proxy.router.refresh()
        self.changed()
        self.events.publish(HealthChanged(upstream.key, upstream.url, healthy, reason))

    def ramp_status(self) -> dict[str, Any] | None:
        if self._ramp is None or self._ramp_target is None:
            return None
        # Seconds left, to a tenth: where the ramp is going and when it gets there.
        remaining = round(max(0.0, self._ramp_ends - self.proxy.loop.time()), 1)
        return {"target": self._ramp_target, "remaining": remaining}

    def stop_ramp(self) -> None:
        """Leave the split where the ramp in progress got it (a successor carries it on)."""
        self._cancel_ramp()

    def _cancel_ramp(self) -> None:
        if self._ramp is not None and not self._ramp.done():
            self._ramp.cancel()
        self._ramp = None
        self._ramp_target = None

    # hot restart -----------------------------------------------------------

    def handover_state(self) -> dict[str, Any]:
        """What a successor needs to carry on: the ramp in progress, and what the admin API
        changed on top of the configuration file (upstreams added, removed, draining)."""
        ramp = None
        if self._ramp is not None and self._ramp_target is not None:
            remaining = max(0.0, self._ramp_ends - self.proxy.loop.time())
            ramp = {"target": self._ramp_target, "remaining": remaining, "by": self._ramp_by}
        router, config = self.proxy.router, self.proxy.config
        added: list[dict[str, Any]] = []
        removed: list[dict[str, Any]] = []
        for name in POOLS:
            listed = {u.url for u in getattr(config.pools, name).upstreams}
            running = {u.url for u in router.pools[name]}
            added += [
                {"pool": name, "url": u.url, "weight": u.weight, "healthy": u.healthy}
                for u in router.pools[name]
                if u.url not in listed
            ]
            removed += [{"pool": name, "url": url} for url in sorted(listed - running)]
        draining = [{"pool": u.pool, "url": u.url} for u in router.upstreams() if u.draining]
        return {"ramp": ramp, "added": added, "removed": removed, "draining": draining}

    def restore(self, state: object) -> None:
        """Carry on what the process this one replaces was doing. Its ramp goes on from the
        split it reached, at the same pace. What its admin API changed is applied on top of
        the configuration this process read: upstreams it added (healthy ones stay in
        rotation), upstreams it removed, and drains."""
        if not isinstance(state, dict):
            return
        proxy = self.proxy
        for item in _items(state.get("removed")):
            for upstream in proxy.router.pools[item["pool"]]:
                if upstream.url == item["url"]:
                    key = upstream.key
                    self._forget(upstream)
                    self.events.publish(UpstreamRemoved(key, upstream.url))
        for item in _items(state.get("added")):
            name: PoolName = item["pool"]
            try:
                fields = {"url": item["url"], "weight": item.get("weight", 1)}
                cfg = UpstreamConfig.model_validate(fields)
            except ValidationError:
                continue
            if getattr(proxy.config.pools, name).unfit(cfg) is not None:
                continue  # this configuration's protocol cannot reach it
            if any((u.host, u.port) == (cfg.host, cfg.port) for u in proxy.router.pools[name]):
                continue
            self._append(name, cfg, cold=item.get("healthy") is not True)
        for item in _items(state.get("draining")):
            for upstream in proxy.router.pools[item["pool"]]:
                if upstream.url == item["url"]:
                    self.drain(upstream.pool, upstream.index, by="hot restart", force=True)
        ramp = state.get("ramp")
        if not isinstance(ramp, dict):
            return
        target, remaining, by = ramp.get("target"), ramp.get("remaining"), ramp.get("by")
        if (
            _number(target)
            and _number(remaining)
            and isinstance(by, str)
            and 0.0 <= target <= 100.0
            and remaining >= 0.0
        ):
            self.set_split(float(target), float(remaining), by=by)

    async def _run_ramp(self, start: float, target: float, over: float, by: str) -> None:
        loop = self.proxy.loop
        began = loop.time()
        while True:
            progress = min(1.0, (loop.time() - began) / over)
            value = start + (target - start) * progress
            self._steer(round(value, 3), by)
            if progress >= 1.0:
                break
            await asyncio.sleep(RAMP_TICK)
        self._ramp = None
        self._ramp_target = None
        self._steer(target, by)
        self.events.publish(SplitChanged(before=start, after=target, by=by, ramp=over))
        if target in (0.0, 100.0):
            self._drain_pool_connections("green" if target == 0.0 else "blue")

    def _drain_pool_connections(self, pool: PoolName) -> None:
        """A pool that gets no new requests keeps no idle connections, and no busy ones past
        drain.timeout. Only what is in flight when its share reaches 0 is timed: a request
        sent there later (override header, failover) is not the split change's to end."""
        busy: set[Exchange] = set()
        for upstream in self.proxy.router.pools[pool]:
            upstream.close_idle()
            busy.update(conn.sink for conn in upstream.connections if conn.sink is not None)
        tunnels = {c for c in self.proxy.tunnels if _tunnel_pool(c) == pool}
        self._spawn(self._expire_pool(pool, busy, tunnels))

    async def _expire_pool(
        self, pool: PoolName, busy: set[Exchange], tunnels: set[ClientConnection]
    ) -> None:
        # What was in flight there holds its upstream's admission slot until it ends (a
        # tunnel until it closes): wait until the pool's upstreams hold none (a request sent
        # there since, by the override header or a failover, is waited for too), or the bound.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.proxy.settings.drain_timeout):
                for upstream in self.proxy.router.pools[pool]:
                    await upstream.until_idle()
        split = self.split
        if (pool == "green" and split == 0.0) or (pool == "blue" and split == 100.0):
            for client in tunnels:
                client.going_away()
            for upstream in self.proxy.router.pools[pool]:
                for conn in list(upstream.connections):
                    if conn.sink is not None and conn.sink in busy:
                        conn.abort()
                upstream.close_idle()

    # upstreams ---------------------------------------------------------------

    def upstream(self, pool: str, index: int) -> Upstream:
        if pool not in POOLS:
            raise ControlError(404, "unknown pool", f"pool must be blue or green, not {pool!r}")
        ups = self.proxy.router.pools[pool]
        if not 0 <= index < len(ups):
            raise ControlError(
                404, "unknown upstream", f"pool {pool} has {len(ups)} upstream(s); no index {index}"
            )
        return ups[index]

    def drain(self, pool: str, index: int, *, by: str = "operator", force: bool = False) -> Change:
        """Take an upstream out of rotation; refused (409) when it is the stable pool's last
        one in rotation, unless `force`: that would push every request to the candidate."""
        upstream = self.upstream(pool, index)
        before = upstream.draining
        if not before and not force:
            self._refuse_emptying_stable(upstream)
        if not before:
            upstream.draining = True
            upstream.drained = False
            self.proxy.router.refresh()
            self.changed()
            upstream.close_idle()
            self.events.publish(Drain(upstream.key, upstream.url, by))
            self._drains[upstream] = self._spawn(self._finish_drain(upstream))
        return Change(f"drain {upstream.key}", {"draining": before}, {"draining": True})

    def undrain(self, pool: str, index: int, *, by: str = "operator") -> Change:
        upstream = self.upstream(pool, index)
        before = upstream.draining
        if before:
            task = self._drains.pop(upstream, None)
            if task is not None:
                task.cancel()
            upstream.draining = False
            upstream.drained = False
            self.proxy.router.refresh()
            self.changed()
            self.events.publish(Undrain(upstream.key, upstream.url, by))
        return Change(f"undrain {upstream.key}", {"draining": before}, {"draining": False})

    def _refuse_emptying_stable(self, upstream: Upstream) -> None:
        proxy = self.proxy
        pool = upstream.pool
        if pool != proxy.stable:
            return  # the candidate's requests fall back on the stable pool: always safe
        green = proxy.spreader.split
        if (green if pool == "green" else 100.0 - green) == 0.0:
            return  # it takes no traffic: nothing would move
        if any(not u.draining for u in proxy.router.pools[pool] if u is not upstream):
            return
        candidate = proxy.candidate
        if proxy.router.fenced == candidate:
            then = f"every request would get 503 ({candidate} is fenced: {proxy.fence_reason})"
        else:
            then = f"every request would fail over to the candidate pool {candidate}"
        raise ControlError(
            409,
            "would empty the stable pool",
            f"{upstream.key} is the last upstream in rotation of the stable pool {pool}: {then}."
            f" Promote {candidate} or shift the traffic first, or force the drain",
        )

    async def _finish_drain(self, upstream: Upstream) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.proxy.settings.drain_timeout):
                await upstream.until_idle()
        forced = upstream.in_flight
        upstream.close_idle()
        # WebSocket tunnels end politely (1001 to both ends); anything else left is cut.
        for client in list(self.proxy.tunnels):
            if client.tunnel is not None and client.tunnel.upstream is upstream:
                client.going_away()
        for conn in list(upstream.connections):
            if not conn.closed:
                conn.abort()
        upstream.drained = True
        self.changed()
        self._drains.pop(upstream, None)
        self.events.publish(Drained(upstream.key, upstream.url, cut_requests=forced))

    async def add_upstream(self, pool: str, url: object, weight: object = 1) -> Change:
        if pool not in POOLS:
            raise ControlError(404, "unknown pool", f"pool must be blue or green, not {pool!r}")
        try:
            cfg = UpstreamConfig.model_validate({"url": url, "weight": weight})
        except ValidationError as exc:
            raise ControlError(400, "invalid upstream", validation_problems(exc)) from exc
        router = self.proxy.router
        name: PoolName = pool
        unfit = getattr(self.proxy.config.pools, name).unfit(cfg)
        if unfit is not None:
            raise ControlError(400, "invalid upstream", f"pool {name}: {unfit}")
        for existing in router.pools[name]:
            if (existing.host, existing.port) == (cfg.host, cfg.port):
                raise ControlError(
                    409, "duplicate upstream", f"{cfg.url} is already {existing.key}"
                )
        upstream = self._append(name, cfg, cold=True)
        return Change(f"add {upstream.key}", None, {"url": upstream.url, "weight": upstream.weight})

    def _append(self, pool: PoolName, cfg: UpstreamConfig, *, cold: bool) -> Upstream:
        """A new upstream at the end of `pool`, watched by the health checks (out of rotation
        until its first pass when `cold`)."""
        proxy = self.proxy
        router = proxy.router
        protocol = getattr(proxy.config.pools, pool).protocol
        upstream = proxy.new_upstream(pool, len(router.pools[pool]), cfg, protocol)
        proxy.router = router.with_pools({pool: (*router.pools[pool], upstream)})
        proxy.watch(upstream, cold=cold)
        self.changed()
        self.events.publish(UpstreamAdded(upstream.key, upstream.url))
        return upstream

    def remove_upstream(
        self, pool: str, index: int, *, by: str = "operator", force: bool = False
    ) -> Change:
        upstream = self.upstream(pool, index)
        if not upstream.draining:
            self.drain(pool, index, by=by, force=force)
        self._spawn(self._remove_when_drained(upstream))
        return Change(
            f"remove {upstream.key}", {"url": upstream.url}, {"removed_after_drain": True}
        )

    async def _remove_when_drained(self, upstream: Upstream) -> None:
        task = self._drains.get(upstream)
        if task is not None:
            await asyncio.shield(task)
        self._forget(upstream)
        self.events.publish(UpstreamRemoved(upstream.key, upstream.url))

    def _forget(self, upstream: Upstream) -> None:
        router = self.proxy.router
        pool = upstream.pool
        if upstream not in router.pools[pool]:
            return
        remaining = tuple(u for u in router.pools[pool] if u is not upstream)
        self.proxy.unwatch(upstream)
        renumbered = [u for i, u in enumerate(remaining) if u.index != i]
        # The health checker knows an upstream by its key (pool/index): follow the new one.
        for u in renumbered:
            self.proxy.unwatch(u)
        for i, u in enumerate(remaining):
            u.place(i, u.weight)
        self.proxy.router = router.with_pools({pool: remaining})
        for u in renumbered:
            self.proxy.watch(u, cold=False)
        self.changed()

    # reload ------------------------------------------------------------------

    async def reload(self, *, by: str = "operator") -> Change:
        path = self.proxy.config_path
        if path is None:
            raise ControlError(409, "no config file", "running on the built-in default")
        try:
            config = await asyncio.to_thread(load_config, path)
        except ConfigError as exc:
            self.events.publish(ReloadFailed(path=path, errors=exc.errors, by=by))
            raise ControlError(400, "invalid config", exc.errors) from exc
        problems = tls_problems(config) + log_problems(config)
        if problems:
            self.events.publish(ReloadFailed(path=path, errors=problems, by=by))
            raise ControlError(400, "invalid config", problems)
        warm = await self._probe_added(config)
        old = self.proxy.config
        before = self._config_summary(old)
        kept = self._kept_by_rollout(old, config)
        self.apply_config(config, warm, keep_split="split" in kept)
        after = self._config_summary(config)
        later = _restart_only_changes(self._running, config)
        if later:
            # Listeners and health checks are set up once: say so rather than pretend.
            log.warning("reload: %s change only at the next restart", ", ".join(later))
            after["restart_needed"] = later
        if kept:
            log.warning("reload: %s", "; ".join(f"{k} {why}" for k, why in kept.items()))
            after["kept_by_rollout"] = kept
        self.events.publish(Reloaded(path=path, by=by, restart_needed=later, kept_by_rollout=kept))
        return Change("reload", before, after)

    def _kept_by_rollout(self, old: Config, new: Config) -> dict[str, str]:
        """What of a reloaded file the rollout in progress does not take, and why. The rest of
        `rollout` (interval, threshold, fallback, gate) applies at once, to the step in
        progress too."""
        rollout = self.proxy.rollout
        kept: dict[str, str] = {}
        if new.split != old.split and rollout.steers_split:
            # As PUT /split is refused: the rollout's step is the split (pause it first).
            kept["split"] = (
                f"kept at {self.split:g}: the {rollout.strategy} rollout in progress steers it"
            )
        if rollout.steps and tuple(new.rollout.steps) != rollout.steps and rollout.in_progress:
            kept["rollout.steps"] = (
                f"apply from the next rollout; the one in progress keeps "
                f"[{', '.join(f'{s:g}' for s in rollout.steps)}]"
            )
        return kept

    async def _probe_added(self, config: Config) -> set[Endpoint]:
        """Check once, before the swap, each upstream the configuration adds. One that passes
        takes traffic from the swap on: replacing a pool's upstreams leaves no moment in which
        the pool has none and its requests fail over to the other pool."""
        router = self.proxy.router
        hc = config.health_check
        added: list[tuple[Endpoint, ssl.SSLContext | None]] = []
        for name in POOLS:
            pool = getattr(config.pools, name)
            current = {u.ident for u in router.pools[name]}
            tls: ssl.SSLContext | None = None
            for cfg in pool.upstreams:
                if upstream_ident(cfg.url, pool.protocol) in current:
                    continue
                if cfg.scheme == "https" and tls is None:
                    try:
                        tls = client_context(pool.tls, h2=pool.protocol == "h2")
                    except TLSSetupError:
                        continue  # left cold: the health checker reports the problem
                added.append(((name, cfg.host, cfg.port), tls if cfg.scheme == "https" else None))
        h2 = {name for name in POOLS if getattr(config.pools, name).protocol != "http1"}
        results = await asyncio.gather(
            *(
                probe(
                    host,
                    port,
                    hc.path,
                    hc.timeout,
                    f"{host}:{port}",
                    tls,
                    h2=pool in h2,
                    grpc_service=hc.service if hc.grpc else None,
                )
                for (pool, host, port), tls in added
            )
        )
        return {endpoint for (endpoint, _), result in zip(added, results, strict=True) if result.ok}

    def apply_config(
        self, config: Config, warm: set[Endpoint] | None = None, *, keep_split: bool = False
    ) -> None:
        """Swap in a validated configuration in one synchronous step; added upstreams start
        out of rotation until their first passing check, except those in `warm` (checked
        just before). An upstream whose URL or protocol changed is a new one: the old one
        drains as a removed one does."""
        proxy = self.proxy
        old = proxy.config
        old_router = proxy.router
        pools: dict[PoolName, tuple[Upstream, ...]] = {}
        removed: list[Upstream] = []
        added: list[Upstream] = []
        renumbered: list[Upstream] = []
        for name in POOLS:
            current = {u.ident: u for u in old_router.pools[name]}
            pool = getattr(config.pools, name)
            kept: list[Upstream] = []
            for i, cfg in enumerate(pool.upstreams):
                upstream = current.pop(upstream_ident(cfg.url, pool.protocol), None)
                if upstream is None:
                    upstream = proxy.new_upstream(name, i, cfg, pool.protocol)
                    added.append(upstream)
                else:
                    if upstream.index != i:
                        # Health checks know it by its key (pool/index): follow the new one.
                        proxy.unwatch(upstream)
                        renumbered.append(upstream)
                    upstream.place(i, cfg.weight)
                kept.append(upstream)
            removed.extend(current.values())
            pools[name] = tuple(kept)
        for upstream in removed:
            proxy.unwatch(upstream)
        self.apply(config, pools)
        if config.split != old.split and not keep_split:
            self._cancel_ramp()
            self._apply_split(config.split, "reload")
        warm = warm or set()
        for upstream in added:
            proxy.watch(upstream, cold=(upstream.pool, upstream.host, upstream.port) not in warm)
        for upstream in renumbered:
            proxy.watch(upstream, cold=False)
        for upstream in removed:
            self._retire(upstream)

    def apply(self, config: Config, pools: dict[PoolName, tuple[Upstream, ...]]) -> None:
        """Swap in `config`, and a routing state of `pools` (keeping the stable pool and the
        fence), in one synchronous step; requests in flight keep the old ones."""
        proxy = self.proxy
        old = proxy.router
        proxy.reconfigure(config, pools)
        proxy.router = Router(
            config,
            pools,
            proxy.spreader,
            proxy.rng,
            stable=old.stable,
            fenced=old.fenced,
            generation=old.generation + 1,
        )
        self.changed()

    def _retire(self, upstream: Upstream) -> None:
        """An upstream that left the configuration: no new requests, the rest finish."""
        upstream.draining = True
        upstream.close_idle()
        self.proxy.unwatch(upstream)
        self._spawn(self._finish_drain(upstream))

    @staticmethod
    def _config_summary(config: Config) -> dict[str, Any]:
        return {name: [u.url for u in getattr(config.pools, name).upstreams] for name in POOLS} | {
            "balancer": config.balancer
        }

    async def close(self) -> None:
        self._cancel_ramp()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


RESTART_ONLY = (
    ("listen.host", lambda c: c.listen.host),
    ("listen.port", lambda c: c.listen.port),
    # Certificates and min_version are applied at reload; turning TLS on or off is not.
    ("listen.tls", lambda c: c.listen.tls is None),
    ("admin", lambda c: (c.admin.host, c.admin.port, c.admin.token_env, c.admin.tls)),
    ("health_check", lambda c: c.health_check),
    ("fleet", lambda c: c.fleet),
)


def _restart_only_changes(old: Config, new: Config) -> list[str]:
    """The settings a reload read but cannot apply to a running process."""
    return [name for name, read in RESTART_ONLY if read(old) != read(new)]


def _items(value: object) -> list[dict[str, Any]]:
    """The well-formed entries of a list of upstreams sent by the process being replaced."""
    if not isinstance(value, list):
        return []
    return [
        item
        for item in value
        if isinstance(item, dict) and item.get("pool") in POOLS and isinstance(item.get("url"), str)
    ]


def _number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _tunnel_pool(client: ClientConnection) -> PoolName | None:
    """The pool of the upstream a client's WebSocket tunnel goes to (None once it ended)."""
    tunnel = client.tunnel
    if tunnel is None or client.closed:
        return None
    return tunnel.upstream.pool
