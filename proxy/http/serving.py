"""The data path's server state: what the client connections of one process share.

`Settings` are the values the hot path reads, prepared once per configuration; `Serving`
holds them with the connections being served, the HTTP/2 sessions and WebSocket tunnels among
them, and whether the process is shutting down. The proxy that composes it (proxy/runtime.py)
routes their requests; its front (`LocalFront`) accepts, expires and drains them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from proxy.config import Config, shield_statuses
from proxy.http.exchange import Outcome, Phase
from proxy.logic.grpcstatus import parse_codes

if TYPE_CHECKING:
    from proxy.http.server import ClientConnection


class Session(Protocol):
    """A client connection that serves many requests at once (an HTTP/2 connection): told of
    the proxy's tick and of its shutdown, like a ClientConnection."""

    def expire(self, now: float) -> None: ...
    def shutdown(self, now: float) -> None: ...
    def abort(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Settings:
    """Values the hot path reads, prepared once per configuration."""

    connect_timeout: float
    response_headers_timeout: float
    request_headers_timeout: float
    idle_timeout: float
    # The inactivity bound of each phase the tick watches (client_body ... tunnel_idle).
    inactivity: Mapping[Phase, float]
    retry_attempts: int
    retry_methods: frozenset[bytes]
    retry_statuses: frozenset[int]
    retry_outcomes: frozenset[Outcome]
    breaker_statuses: frozenset[int]
    # A candidate's answers retried on the stable pool (rollout.shield), and with them every
    # status the data path looks at twice: one lookup per answer.
    shield_statuses: frozenset[int]
    shield_failures: bool
    failure_statuses: frozenset[int]
    drain_timeout: float
    max_connections: int
    http2: bool
    max_target: int
    max_head: int
    max_headers: int
    # Raw bytes of a request head still arriving: the limits above plus the request line and
    # whitespace. httptools holds a header's pieces until the header ends; this bounds that.
    max_head_bytes: int
    grpc_failures: frozenset[int]  # grpc-status codes that count as the server's failure

    @classmethod
    def from_config(cls, config: Config, share: int = 1) -> Settings:
        """The settings by `config`, for one process of `share` that serve the same port."""
        t = config.timeouts
        r = config.retries
        outcomes = {Outcome.RETRY_STATUS, Outcome.RESET}
        if "connect_error" in r.on:
            outcomes.add(Outcome.CONNECT_ERROR)
        if "timeout" in r.on:
            outcomes.add(Outcome.TIMEOUT)
        statuses = frozenset(x for x in r.on if isinstance(x, int))
        shield = shield_statuses(config.rollout.shield)
        return cls(
            connect_timeout=t.connect,
            response_headers_timeout=t.response_headers,
            request_headers_timeout=t.request_headers,
            idle_timeout=t.idle,
            inactivity={
                Phase.CLIENT_BODY: t.client_body,
                Phase.CLIENT_SEND: t.client_send,
                Phase.UPSTREAM_BODY: t.upstream_body,
                Phase.TUNNEL_IDLE: t.tunnel_idle,
            },
            retry_attempts=r.attempts,
            retry_methods=frozenset(m.encode("ascii") for m in r.methods),
            retry_statuses=statuses,
            retry_outcomes=frozenset(outcomes),
            # The upstream's own 5xx answers that count as breaker failures: those the
            # operator also treats as retriable (502/503/504 by default).
            breaker_statuses=statuses,
            shield_statuses=shield,
            shield_failures=bool(config.rollout.shield),
            failure_statuses=statuses | shield,
            drain_timeout=config.drain.timeout,
            max_connections=math.ceil(config.listen.max_connections / share),
            http2=config.listen.http2,
            max_target=config.listen.max_request_target,
            max_head=config.listen.max_header_bytes,
            max_headers=config.listen.max_header_fields,
            max_head_bytes=config.listen.max_request_target + config.listen.max_header_bytes + 1024,
            grpc_failures=parse_codes(list(config.grpc.failures)),
        )


class Serving:
    """The client connections of one process and what they share."""

    __slots__ = ("connections", "sessions", "settings", "shutting_down", "tunnels")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connections: set[ClientConnection] = set()
        # Client connections that serve several requests at once (HTTP/2): each of their
        # requests runs on a connection of its own in `connections` as well.
        self.sessions: set[Session] = set()
        self.tunnels: set[ClientConnection] = set()
        self.shutting_down = False

    def __repr__(self) -> str:
        return (
            f"<Serving connections={len(self.connections)} sessions={len(self.sessions)}"
            f" tunnels={len(self.tunnels)}{' shutting down' if self.shutting_down else ''}>"
        )
