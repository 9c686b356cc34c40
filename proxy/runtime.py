"""The proxy runtime: listeners, live routing state, the control tick, ordered shutdown."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from dataclasses import dataclass

from .config import Config
from .exchange import Outcome
from .router import POOLS, Router
from .routing import PoolName, SplitSpreader
from .server import ClientConnection
from .upstream import Upstream

log = logging.getLogger("turnout")

TICK = 0.5
BACKLOG = 4096


@dataclass(frozen=True, slots=True)
class Settings:
    """Values the hot path reads, prepared once per configuration."""

    connect_timeout: float
    response_headers_timeout: float
    request_headers_timeout: float
    idle_timeout: float
    retry_attempts: int
    retry_methods: frozenset[bytes]
    retry_statuses: frozenset[int]
    retry_outcomes: frozenset[Outcome]
    drain_timeout: float

    @classmethod
    def from_config(cls, config: Config) -> Settings:
        t = config.timeouts
        r = config.retries
        outcomes = {Outcome.RETRY_STATUS, Outcome.RESET}
        if "connect_error" in r.on:
            outcomes.add(Outcome.CONNECT_ERROR)
        if "timeout" in r.on:
            outcomes.add(Outcome.TIMEOUT)
        return cls(
            connect_timeout=t.connect,
            response_headers_timeout=t.response_headers,
            request_headers_timeout=t.request_headers,
            idle_timeout=t.idle,
            retry_attempts=r.attempts,
            retry_methods=frozenset(m.encode("ascii") for m in r.methods),
            retry_statuses=frozenset(x for x in r.on if isinstance(x, int)),
            retry_outcomes=frozenset(outcomes),
            drain_timeout=config.drain.timeout,
        )


def build_pools(config: Config) -> dict[PoolName, tuple[Upstream, ...]]:
    pools: dict[PoolName, tuple[Upstream, ...]] = {}
    for name in POOLS:
        pool_cfg = getattr(config.pools, name)
        pools[name] = tuple(
            Upstream.from_config(name, i, u) for i, u in enumerate(pool_cfg.upstreams)
        )
    return pools


class Proxy:
    """Owns the listener, the routing state and every client connection."""

    def __init__(
        self, config: Config, *, config_path: str | None = None, rng: random.Random | None = None
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.log = log
        self.loop = asyncio.get_running_loop()
        self.settings = Settings.from_config(config)
        self.spreader = SplitSpreader(config.split)
        self.router = Router(config, build_pools(config), self.spreader, rng)
        self.connections: set[ClientConnection] = set()
        self.tunnels: set[ClientConnection] = set()
        self.shutting_down = False
        self.server: asyncio.Server | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self, sock: socket.socket | None = None) -> int:
        """Start listening (on `sock` when given, else on listen.host:port); returns the port."""
        listen = self.config.listen
        if sock is None:
            self.server = await self.loop.create_server(
                lambda: ClientConnection(self),
                listen.host,
                listen.port,
                backlog=BACKLOG,
                reuse_address=True,
            )
        else:
            self.server = await self.loop.create_server(
                lambda: ClientConnection(self), sock=sock, backlog=BACKLOG
            )
        self.port = self.server.sockets[0].getsockname()[1]
        self._tick_task = self.loop.create_task(self._tick())
        return self.port

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = self.loop.time()
            for conn in list(self.connections):
                conn.expire(now)
            idle_before = now - self.settings.idle_timeout
            for upstream in self.router.upstreams():
                if upstream.idle:
                    upstream.close_idle(idle_before)

    def set_split(self, split: float) -> None:
        self.spreader.set_split(split)

    @property
    def in_flight(self) -> int:
        return sum(u.in_flight for u in self.router.upstreams())

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, let requests in flight finish (bounded), then close everything."""
        if self.shutting_down:
            return
        self.shutting_down = True
        timeout = self.settings.drain_timeout if timeout is None else timeout
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        if self._tick_task is not None:
            self._tick_task.cancel()
        for upstream in self.router.upstreams():
            upstream.close_idle()
            for uconn in list(upstream.connections):
                uconn.close()
        if self.server is not None:
            await self.server.wait_closed()

    def __repr__(self) -> str:
        return (
            f"<Proxy port={self.port} connections={len(self.connections)} "
            f"in_flight={self.in_flight} {self.router!r}>"
        )
