"""Live per-upstream state and the pooled keep-alive connections to it."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final, Protocol, cast

import httptools

from proxy.http.headers import (
    HOP_BY_HOP,
    HOP_BY_HOP_LENGTHS,
    MAX_CHUNK_FRAMING,
    MAX_RESPONSE_HEAD,
    NAMING_HEADERS,
    add_field,
    add_hop_names,
    plain_connection,
)
from proxy.logic.admission import Admission, AdmissionSnapshot, Limits
from proxy.logic.breaker import Breaker, BreakerSettings, BreakerState
from proxy.logic.gauges import MemberGauges
from proxy.logic.routing import PoolName

if TYPE_CHECKING:
    from proxy.http.exchange import Exchange

log = logging.getLogger("turnout.upstream")

DEFAULT_BREAKER = BreakerSettings(
    consecutive_failures=5,
    failure_ratio=0.5,
    min_requests=20,
    window=10.0,
    open_for=5.0,
    half_open_requests=3,
)
DEFAULT_LIMITS = Limits(max_in_flight=256, queue=512, queue_timeout=1.0)


class ConnectError(Exception):
    """The upstream could not be reached (refused, unreachable, timed out, TLS failure)."""


class BadResponse(Exception):
    """The upstream answered with something that is not valid HTTP/1.1."""


class Multiplexer(Protocol):
    """Connections to an upstream that carry many requests at once (HTTP/2): it gives each
    UpstreamConnection of the data path a transport of its own on one of them."""

    async def attach(self, conn: UpstreamConnection, timeout: float) -> None: ...


class TunnelPeer(Protocol):
    """The client end of a tunnel, as the upstream connection sees it."""

    def relay(self, data: bytes) -> None: ...
    def close(self) -> None: ...
    def upstream_eof(self) -> bool | None: ...
    def upstream_pause(self) -> None: ...
    def upstream_resume(self) -> None: ...


@dataclass(frozen=True, slots=True)
class UpstreamSnapshot:
    pool: str
    index: int
    url: str
    weight: int
    state: str
    healthy: bool
    draining: bool
    drained: bool
    breaker: str
    in_flight: int
    queued: int
    idle_connections: int
    requests: int
    failures: int


# What `Upstream.state_name()` says, as /status and /metrics name it.
UPSTREAM_STATES: Final = ("up", "down", "draining", "drained", "breaker_open", "breaker_half_open")


def upstream_ident(url: str, protocol: str) -> str:
    """What an upstream is, as its URL and its pool's protocol say: a configuration that keeps
    both keeps the upstream (with its live state); one that changes either replaces it."""
    return f"{protocol} {url}"


class Upstream:
    """One endpoint of a pool: its live counters and its idle connection pool. What it is
    (pool, URL, protocol) never changes; its place in the routing snapshot that holds it
    (index, weight) is set by whoever builds that snapshot (`place`), in the same step."""

    __slots__ = (
        "admission",
        "attempts",
        "breaker",
        "codes",
        "connections",
        "drained",
        "draining",
        "failures",
        "healthy",
        "host",
        "host_header",
        "ident",
        "idle",
        "index",
        "members",
        "mux",
        "pool",
        "port",
        "requests",
        "ssl",
        "url",
        "weight",
    )

    def __init__(
        self,
        pool: PoolName,
        index: int,
        url: str,
        host: str,
        port: int,
        weight: int,
        *,
        protocol: str = "http1",
        breaker: Breaker | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.pool: Final = pool
        self.index = index
        self.url: Final = url
        self.ident: Final = upstream_ident(url, protocol)
        self.host: Final = host
        self.port: Final = port
        self.host_header = f"{host}:{port}".encode("latin-1")
        self.weight = weight
        self.breaker = breaker or Breaker(DEFAULT_BREAKER, clock=time.monotonic)
        self.admission = admission or Admission(DEFAULT_LIMITS)
        # In a process that serves none of its requests (a supervisor), what the processes
        # that do hold there: the readouts below come from it, the admission and breaker above
        # only hold the settings. None: this process's own admission and breaker are the truth.
        self.members: MemberGauges | None = None
        # Client TLS towards an https:// upstream (None for http://).
        self.ssl: ssl.SSLContext | None = None
        # HTTP/2 towards the upstream (None: HTTP/1.1, a connection per request in flight).
        self.mux: Multiplexer | None = None
        self.requests = 0
        self.failures = 0
        # Final status codes answered from this upstream: plain ints bumped by the data
        # path, read by /metrics at scrape time.
        self.codes: dict[int, int] = {}
        # Every attempt's outcome (a retried or shielded one too): its status code, or what
        # went wrong ("connect_error", "reset", ...); stats.CODE_LABELS spares a str per count.
        self.attempts: dict[str, int] = {}
        self.healthy = True
        self.draining = False
        self.drained = False
        # LIFO: the most recently used connection is the least likely to have been
        # closed by the upstream's own keep-alive timeout.
        self.idle: deque[UpstreamConnection] = deque()
        self.connections: set[UpstreamConnection] = set()

    @property
    def in_flight(self) -> int:
        members = self.members
        return self.admission.in_flight if members is None else members.in_flight

    @property
    def queued(self) -> int:
        members = self.members
        return self.admission.queued if members is None else members.queued

    @property
    def breaker_state(self) -> BreakerState:
        """Reading it moves an open breaker whose time is up to half-open."""
        members = self.members
        return self.breaker.state if members is None else members.breaker

    def limits(self) -> AdmissionSnapshot:
        """The admission's limits with the requests it holds and has shed."""
        own = self.admission.snapshot()
        members = self.members
        if members is None:
            return own
        shed = members.shed
        return replace(
            own,
            in_flight=members.in_flight,
            queued=members.queued,
            shed_queue_full=shed["queue_full"],
            shed_queue_timeout=shed["queue_timeout"],
            shed_rate_limited=shed["rate_limited"],
        )

    async def until_idle(self) -> None:
        """Return once no request is in flight here (bound it with a timeout)."""
        members = self.members
        if members is None:
            await self.admission.until_idle()
        else:
            await members.until_idle()

    @property
    def available(self) -> bool:
        """May take new requests (the breaker is asked again at pick time)."""
        return self.healthy and not self.draining and self.breaker_state is not BreakerState.OPEN

    def state_name(self) -> str:
        if self.drained:
            return "drained"
        if self.draining:
            return "draining"
        if not self.healthy:
            return "down"
        state = self.breaker_state
        if state is BreakerState.OPEN:
            return "breaker_open"
        if state is BreakerState.HALF_OPEN:
            return "breaker_half_open"
        return "up"

    @property
    def key(self) -> str:
        return f"{self.pool}/{self.index}"

    def place(self, index: int, weight: int) -> bool:
        """Its place in the routing snapshot being built; True when that moved it."""
        if (index, weight) == (self.index, self.weight):
            return False
        self.index, self.weight = index, weight
        return True

    def pop_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def connect(self, timeout: float) -> UpstreamConnection:
        conn = UpstreamConnection(self)
        if self.mux is not None:
            await self.mux.attach(conn, timeout)
            return conn
        await self.open(lambda: conn, timeout)
        return conn

    async def open(self, factory: Callable[[], object], timeout: float) -> None:
        """A connection to the upstream for the protocol `factory` makes (TLS for https://);
        every way it can fail is a ConnectError saying why."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                if self.ssl is None:
                    await loop.create_connection(protocol_factory(factory), self.host, self.port)
                else:
                    await loop.create_connection(
                        protocol_factory(factory),
                        self.host,
                        self.port,
                        ssl=self.ssl,
                        server_hostname=self.host,
                        ssl_handshake_timeout=timeout,
                    )
        except TimeoutError as exc:
            raise ConnectError(f"connect timeout after {timeout:g}s") from exc
        except ssl.SSLError as exc:
            # A certificate the pool's CA does not vouch for is a connect failure like any
            # other for breakers and retries; the reason goes to the log.
            log.warning("TLS to upstream %s failed: %s", self.url, exc)
            raise ConnectError(f"TLS handshake failed: {exc.reason or exc}") from exc
        except OSError as exc:
            # The reason alone ("Connection refused"): the loop's own text names the address.
            reason = os.strerror(exc.errno) if exc.errno else exc.strerror or str(exc)
            raise ConnectError(reason) from exc

    def release(self, conn: UpstreamConnection, reusable: bool, now: float) -> None:
        if reusable and not conn.closed and not self.draining:
            conn.idle_since = now
            self.idle.append(conn)
        else:
            conn.close()

    def close_idle(self, older_than: float | None = None) -> int:
        """Close pooled connections idle since before `older_than` (all when None)."""
        closed = 0
        keep: deque[UpstreamConnection] = deque()
        for conn in self.idle:
            if older_than is None or conn.idle_since < older_than:
                conn.close()
                closed += 1
            else:
                keep.append(conn)
        self.idle = keep
        return closed

    def snapshot(self) -> UpstreamSnapshot:
        return UpstreamSnapshot(
            pool=self.pool,
            index=self.index,
            url=self.url,
            weight=self.weight,
            state=self.state_name(),
            healthy=self.healthy,
            draining=self.draining,
            drained=self.drained,
            breaker=self.breaker_state.value,
            in_flight=self.in_flight,
            queued=self.queued,
            idle_connections=len(self.idle),
            requests=self.requests,
            failures=self.failures,
        )

    def __repr__(self) -> str:
        return (
            f"<Upstream {self.key} {self.url} w={self.weight} {self.state_name()} "
            f"in_flight={self.in_flight} idle={len(self.idle)}>"
        )


def protocol_factory(factory: Callable[[], object]) -> Callable[[], asyncio.Protocol]:
    """`factory` as the event loop's protocol factory. The data path's protocols do not
    inherit asyncio.Protocol (compiled, they are native classes, which cannot): the loop only
    calls their methods, and this tells the type checker so."""
    return cast("Callable[[], asyncio.Protocol]", factory)


class UpstreamConnection:
    """One keep-alive HTTP/1.1 connection to an upstream, serving one exchange at a time
    (an asyncio protocol)."""

    __slots__ = (
        "closed",
        "ended",
        "fields",
        "framing",
        "head_request",
        "head_size",
        "idle_since",
        "in_head",
        "keep_alive",
        "length",
        "named",
        "no_body",
        "parser",
        "reason",
        "reused",
        "sink",
        "te",
        "trailers",
        "transport",
        "tunnel",
        "upstream",
    )

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        # The exchange it serves: typed as the class itself (not a Protocol), so that the
        # compiled data path calls it directly instead of looking each method up by name.
        self.sink: Exchange | None = None
        self.tunnel: TunnelPeer | None = None
        # The response head being read, sorted as it arrives: the end-to-end fields as
        # (name, b": ", value, CRLF) runs, ready to relay; Content-Length; whether a
        # Transfer-Encoding came; the further names Connection declared hop-by-hop.
        self.fields: list[bytes] = []
        # The trailer fields of a chunked response, as runs like `fields` (None: none came).
        self.trailers: list[bytes] | None = None
        self.length: bytes | None = None
        self.te = False
        self.named: set[bytes] | None = None
        self.reason = b""
        # Bytes read while a head was under way (its fields are bounded per read, not per
        # field: a check per field costs more than the rest of the field's handling).
        self.head_size = 0
        self.in_head = False
        # Likewise a chunk-size line or the trailer section (none of it is relayed).
        self.framing = False
        self.closed = False
        # A response ended during the current read: the exchange hears of it once the read
        # is parsed, so a byte after the end can still make the connection unusable first.
        self.ended = False
        self.reused = False
        self.no_body = False
        self.head_request = False
        self.idle_since = 0.0
        self.keep_alive = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.upstream.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.upstream.connections.discard(self)
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.close()
            return
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.upstream_failed(self, exc)

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.relay(data)
            return
        if self.sink is None:
            # Bytes on an idle connection: the upstream is out of step; never reuse it.
            self.close()
            return
        sink = self.sink
        if self.in_head or self.framing:
            # Counted before parsing: a phase that begins in this read starts its count afresh.
            self.head_size += len(data)
        try:
            self.parser.feed_data(data)
            if self.in_head:
                # The head goes on in the next read: what llhttp holds of it is bounded here.
                if self.head_size > MAX_RESPONSE_HEAD:
                    self._fail(BadResponse("response head too large"))
                    return
            elif self.framing and self.head_size > MAX_CHUNK_FRAMING:
                self._fail(BadResponse("chunk size line or trailer section too large"))
                return
        except httptools.HttpParserUpgrade as exc:
            sink = self.sink
            if sink is not None:
                sink.upstream_upgraded(self, data[exc.args[0] :])
            return
        except httptools.HttpParserError as exc:
            if not self.ended:
                # httptools re-raises a callback's exception as the context of its own error.
                self._fail(BadResponse(str(exc.__context__ or exc)))
                return
            # Bytes after the end of a response (see on_message_begin): the response itself
            # is whole and goes to its client, but the connection is out of step.
            self.keep_alive = False
        if self.ended:
            self.ended = False
            self._done()
        else:
            sink.flush()

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            return self.tunnel.upstream_eof()  # a half-close passes on through a tunnel
        return None  # the transport closes; connection_lost reports to the exchange

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_pause()
        elif self.tunnel is not None:
            self.tunnel.upstream_pause()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_resume()
        elif self.tunnel is not None:
            self.tunnel.upstream_resume()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.ended:
            # The upstream wrote more than the response it owed (a wrong Content-Length, a
            # body after HEAD, 204 or 304): whatever follows would be read as the answer to
            # the next client's request on this connection. Stop here; never reuse it.
            raise BadResponse("bytes after the end of the response")
        self.fields = []
        self.trailers = None
        self.length = None
        self.te = False
        self.named = None
        self.head_size = 0
        self.in_head = True
        self.framing = False
        self.reason = b""

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.framing:
            # A trailer field (gRPC's status travels here), relayed at the end of the body;
            # their size is bounded in data_received.
            if not HOP_BY_HOP_LENGTHS >> len(name) & 1 or name.lower() not in HOP_BY_HOP:
                trailers = self.trailers
                if trailers is None:
                    trailers = self.trailers = []
                add_field(trailers, name, value)
            return
        if HOP_BY_HOP_LENGTHS >> len(name) & 1:
            lname = name.lower()
            # The two hop-by-hop fields nearly every response has, by == (a set lookup hashes
            # each new name); the rarer ones through the sets.
            if lname == b"content-length":
                self.length = value
                return
            if lname == b"connection":
                if not plain_connection(value):
                    self.named = add_hop_names(self.named, value)
                return
            if lname in HOP_BY_HOP:
                if lname == b"transfer-encoding":
                    self.te = True
                elif lname in NAMING_HEADERS and not plain_connection(value):
                    self.named = add_hop_names(self.named, value)
                return
        add_field(self.fields, name, value)

    def on_headers_complete(self) -> None:
        parser = self.parser
        self._head_complete(parser.get_status_code(), bool(parser.should_keep_alive()))

    def _head_complete(self, status: int, keep_alive: bool) -> None:
        self.in_head = False
        # A chunked body begins with a chunk-size line: counted until a body byte arrives.
        self.framing = self.te
        self.head_size = 0
        if not 100 <= status <= 599:
            raise BadResponse(f"status {status} outside 100-599")
        if 100 <= status < 200 and status != 101:
            return  # interim responses are consumed here; the proxy answers 100-continue itself
        sink = self.sink
        if sink is not None:
            # Read now: the parser of a bodiless response is replaced before the exchange ends.
            self.keep_alive = keep_alive
            sink.upstream_head(self, status)
            if self.no_body and self.sink is not None:
                # A response to HEAD (or a 204/304) has no body whatever its headers say;
                # llhttp cannot be told, so this message ends here and a fresh parser takes
                # the next one. An application that writes its GET body for HEAD too may
                # send it in a later read, after the next request went out, where it would
                # be read as that request's answer: after a HEAD whose head announced a body
                # the connection is not reused. (llhttp itself knows 204 and 304 have none.)
                self.parser = httptools.HttpResponseParser(self)
                if self.head_request and (
                    self.te or (self.length is not None and self.length.strip(b" \t0"))
                ):
                    self.keep_alive = False
                self.ended = True

    def on_body(self, body: bytes) -> None:
        self.framing = False
        if self.ended:
            raise BadResponse("body after a response that has none")
        sink = self.sink
        if sink is not None:
            sink.upstream_body(body)

    def on_chunk_header(self) -> None:
        # The chunk's data follows, or after the last chunk the trailer section.
        self.head_size = 0

    def on_chunk_complete(self) -> None:
        # The next chunk-size line, or the end of the body, follows.
        self.framing = True
        self.head_size = 0

    def on_message_complete(self) -> None:
        if self.ended or 100 <= self.parser.get_status_code() < 200:
            return
        self.ended = True

    # an HTTP/2 stream's answer (a virtual connection of h2upstream): parsed by its codec,
    # taken as llhttp's callbacks give an HTTP/1.1 one

    def stream_head(self, fields: Iterable[tuple[bytes, bytes]], ended: bool) -> None:
        sink = self.sink
        if sink is None:
            return
        try:
            self.on_message_begin()
            status = 0
            for name, value in fields:
                if name[:1] != b":":
                    self.on_header(name, value)
                elif name == b":status" and value.isdigit():
                    status = int(value)
            if self.length is None:
                if not ended:
                    # A body of unknown length, maybe with trailers: relayed as a chunked one.
                    self.te = True
                elif status >= 200:
                    self.length = b"0"
            self._head_complete(status, True)
        except BadResponse as exc:
            self._fail(exc)
            return
        if ended or self.ended:
            self.ended = False
            self._done()
        else:
            sink.flush()

    def stream_body(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            return
        try:
            self.on_body(data)
        except BadResponse as exc:
            self._fail(exc)
            return
        sink.flush()

    def stream_trailers(self, fields: Iterable[tuple[bytes, bytes]]) -> None:
        self.framing = True  # what on_header takes for trailer fields
        for name, value in fields:
            if name[:1] != b":":
                self.on_header(name, value)

    def stream_end(self) -> None:
        self._done()

    # helpers

    def _done(self) -> None:
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.upstream_done(self)

    def _fail(self, exc: Exception) -> None:
        sink = self.sink
        self.sink = None
        self.close()
        if sink is not None:
            sink.upstream_failed(self, exc)

    def start(self, sink: Exchange, head: bytes, no_body: bool) -> None:
        """Begin one exchange: send the request head; the body follows via write()."""
        self.sink = sink
        self.no_body = self.head_request = no_body
        assert self.transport is not None
        self.transport.write(head)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def write_eof(self) -> bool:
        """Half-close towards the upstream; False when the transport cannot (TLS)."""
        transport = self.transport
        if transport is None or self.closed or not transport.can_write_eof():
            return False
        transport.write_eof()
        return True

    def write_buffer_size(self) -> int:
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def should_keep_alive(self) -> bool:
        return self.keep_alive

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def detach(self) -> None:
        """Forget the current exchange (it ended early); the connection cannot be reused."""
        self.sink = None
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("busy" if self.sink is not None else "idle")
        return f"<UpstreamConnection {self.upstream.key} {state}>"
