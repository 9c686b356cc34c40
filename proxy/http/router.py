"""The routing snapshot read by the data path: pools, eligible candidates, balancer."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from proxy.http.upstream import Upstream
from proxy.logic.balancer import Balancer, make_balancer
from proxy.logic.routing import (
    PoolName,
    SplitSpreader,
    cookie_value,
    sticky_bucket,
    sticky_is_green,
)

if TYPE_CHECKING:
    from proxy.config import Config

POOLS: tuple[PoolName, PoolName] = ("blue", "green")
OTHER: dict[PoolName, PoolName] = {"blue": "green", "green": "blue"}


class Router:
    """Chooses a pool for a request, then an upstream inside it (failing over when empty).

    The candidate tuples hold only upstreams that may take new requests; they are rebuilt by
    `refresh()` when an upstream's health or drain state changes, never per request.
    """

    __slots__ = (
        "balancer",
        "candidates",
        "fenced",
        "override_header",
        "pools",
        "spreader",
        "sticky_cookie",
        "sticky_header",
    )

    def __init__(
        self,
        config: Config,
        pools: dict[PoolName, tuple[Upstream, ...]],
        spreader: SplitSpreader,
        rng: random.Random | None = None,
    ) -> None:
        self.pools = pools
        self.spreader = spreader
        self.balancer: Balancer[Any] = make_balancer(config.balancer, rng or random.Random())
        # Off (null): no field has an empty name, so nothing matches.
        override = config.override_header
        self.override_header = override.lower().encode("latin-1") if override else b""
        sticky = config.sticky
        self.sticky_cookie = sticky.cookie.encode("latin-1") if sticky.cookie else None
        self.sticky_header = sticky.header.lower().encode("latin-1") if sticky.header else None
        self.candidates: dict[PoolName, tuple[Upstream, ...]] = {"blue": (), "green": ()}
        # A pool no request fails over to: the candidate a rollout has just rolled back.
        self.fenced: PoolName | None = None
        self.refresh()

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
            f"<Router{fenced} split={self.spreader.split:g} blue={len(self.candidates['blue'])}/"
            f"{len(self.pools['blue'])} green={len(self.candidates['green'])}/"
            f"{len(self.pools['green'])}>"
        )
