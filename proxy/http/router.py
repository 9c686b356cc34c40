"""The routing state read by the data path: pools, eligible candidates, the stable pool, the
fence, balancer. Control (proxy/control/changes.py) is its only writer."""

from __future__ import annotations

import random
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from proxy.http.upstream import Upstream
from proxy.logic.balancer import Balancer, make_balancer
from proxy.logic.routing import (
    OTHER,
    POOLS,
    PoolName,
    SplitSpreader,
    cookie_value,
    sticky_bucket,
    sticky_is_green,
)

if TYPE_CHECKING:
    from proxy.config import Config


class Router:
    """Chooses a pool for a request, then an upstream inside it (failing over when empty).

    The candidate tuples hold only upstreams that may take new requests; they are rebuilt by
    `refresh()` when an upstream's health or drain state changes, never per request. Its pools
    are never edited: a change of an upstream set is a new Router (`with_pools`), one reference
    swapped, its `generation` one more; a request in flight keeps the one it started with.
    """

    __slots__ = (
        "balancer",
        "candidates",
        "config",
        "fenced",
        "generation",
        "override_header",
        "pools",
        "spreader",
        "stable",
        "sticky_cookie",
        "sticky_header",
    )

    def __init__(
        self,
        config: Config,
        pools: dict[PoolName, tuple[Upstream, ...]],
        spreader: SplitSpreader,
        rng: random.Random | None = None,
        *,
        stable: PoolName = "blue",
        fenced: PoolName | None = None,
        balancer: Balancer[Any] | None = None,
        generation: int = 1,
    ) -> None:
        self.config = config
        self.generation = generation
        self.pools: Mapping[PoolName, tuple[Upstream, ...]] = MappingProxyType(dict(pools))
        self.spreader = spreader
        # The pool that holds the traffic; it flips at each promotion.
        self.stable: PoolName = stable
        self.balancer: Balancer[Any] = balancer or make_balancer(
            config.balancer, rng or random.Random()
        )
        # Off (null): no field has an empty name, so nothing matches.
        override = config.override_header
        self.override_header = override.lower().encode("latin-1") if override else b""
        sticky = config.sticky
        self.sticky_cookie = sticky.cookie.encode("latin-1") if sticky.cookie else None
        self.sticky_header = sticky.header.lower().encode("latin-1") if sticky.header else None
        self.candidates: dict[PoolName, tuple[Upstream, ...]] = {"blue": (), "green": ()}
        # A pool no request fails over to: the candidate a rollout has just rolled back.
        self.fenced: PoolName | None = fenced
        self.refresh()

    def with_pools(self, pools: Mapping[PoolName, tuple[Upstream, ...]]) -> Router:
        """The next routing state: `pools` (those not given as here), the rest as here."""
        return Router(
            self.config,
            {name: pools.get(name, self.pools[name]) for name in POOLS},
            self.spreader,
            stable=self.stable,
            fenced=self.fenced,
            balancer=self.balancer,
            generation=self.generation + 1,
        )

    def refresh(self) -> None:
        for name in POOLS:
            self.candidates[name] = tuple(u for u in self.pools[name] if u.available)

    def choose_pool(self, override: PoolName | None, sticky_key: bytes | None) -> PoolName:
        if override is not None:
            return override
        if sticky_key is not None:
            bucket = sticky_bucket(sticky_key)
            return "green" if sticky_is_green(bucket, self.spreader.split) else "blue"
        return "green" if self.spreader.next_is_green() else "blue"

    def sticky_key(self, cookie: bytes | None, header: bytes | None) -> bytes | None:
        if self.sticky_cookie is not None and cookie is not None:
            value = cookie_value(cookie, self.sticky_cookie)
            if value:
                return value
        return header or None

    def may_fail_over(self, pool: PoolName) -> bool:
        """Whether a request for `pool` may go to the other pool when `pool` has nothing left."""
        return OTHER[pool] != self.fenced

    def pick_in(self, pool: PoolName, exclude: Upstream | None = None) -> Upstream | None:
        """An upstream of `pool` only."""
        upstream: Upstream | None = self.balancer.pick(self.candidates[pool], exclude)
        return upstream

    def pick_admissible(self, pool: PoolName, forced: bool = False) -> Upstream | None:
        """An upstream of `pool`, else of the other pool (failover) unless the pool is `forced`
        (by the override header) or the other pool is fenced. An upstream whose in-flight
        limit and queue are full is passed over for another one of the same pool when there is
        one; never for the other pool: overload is shed with 503 there, not spilled onto a pool
        the split (or the override header) did not choose."""
        balancer = self.balancer
        upstream: Upstream | None = balancer.pick(self.candidates[pool], None)
        if upstream is None:
            other = OTHER[pool]
            if forced or other == self.fenced:
                return None
            upstream = balancer.pick(self.candidates[other], None)
            if upstream is None:
                return None
        if upstream.admission.full:
            spare = self.pick_in(upstream.pool, upstream)
            if spare is not None and not spare.admission.full:
                return spare
        return upstream

    def upstreams(self) -> list[Upstream]:
        return [u for name in POOLS for u in self.pools[name]]

    def __repr__(self) -> str:
        fenced = f" fenced={self.fenced}" if self.fenced else ""
        return (
            f"<Router {self.generation}{fenced} split={self.spreader.split:g}"
            f" blue={len(self.candidates['blue'])}/{len(self.pools['blue'])}"
            f" green={len(self.candidates['green'])}/"
            f"{len(self.pools['green'])}>"
        )
