"""Client-facing HTTP/1.1 connections: parsing, pipelining, flow control, tunnels."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Final, cast

import httptools

from proxy.http import headers as h
from proxy.http.exchange import Exchange, Phase, Stage

if TYPE_CHECKING:
    from proxy.http.h2front import H2Stream
    from proxy.http.upstream import UpstreamConnection
    from proxy.runtime import Proxy


# WebSocket close frames with status 1001 (RFC 6455 §5.5.1, §7.4.1); frames a client sends
# are masked, so the one towards the upstream carries a mask (of zeros, which is allowed).
WS_GOING_AWAY_TO_CLIENT = b"\x88\x02\x03\xe9"
WS_GOING_AWAY_TO_UPSTREAM = b"\x88\x82\x00\x00\x00\x00\x03\xe9"


_BUSY = b'{"error": "max_connections", "detail": "listen.max_connections reached"}\n'
TOO_MANY_CONNECTIONS = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(_BUSY), _BUSY)
)


# At shutdown, how long a keep-alive connection must have been idle before it is closed.
SHUTDOWN_IDLE_GRACE = 0.5

# Which ends of a tunnel have finished sending (a half-close passes on to the other end).
EOF_CLIENT: Final = 1
EOF_UPSTREAM: Final = 2


class HeadError(Exception):
    """The request head broke a limit; carries the status to answer with."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class ClientConnection:
    """One client connection (an asyncio protocol); runs its requests one at a time, in order."""

    PAUSE_PIPELINE = 1
    PAUSE_BODY = 2
    PAUSE_UPSTREAM = 4
    PAUSE_TUNNEL = 8

    __slots__ = (
        "active",
        "between",
        "client_progress",
        "closed",
        "closing",
        "deadline",
        "feeding",
        "feeding_at",
        "forwarded",
        "fresh",
        "head_bytes",
        "head_deadline",
        "head_size",
        "head_timer",
        "head_timer_at",
        "headers",
        "held",
        "held_at",
        "idle_since",
        "in_frame",
        "in_head",
        "line",
        "line_at",
        "parser",
        "parsing",
        "paused",
        "peer_ip",
        "pipeline",
        "proxy",
        "scheme",
        "serving",
        "stream",
        "task",
        "trailers",
        "transport",
        "tunnel",
        "tunnel_eof",
        "tunnel_exchange",
        "upstream_progress",
        "url",
        "watch_buffer",
        "watch_count",
        "watch_phase",
        "watch_since",
        "write_paused",
    )

    def __init__(self, proxy: Proxy, parse: bool = True) -> None:
        self.proxy = proxy
        self.serving = proxy.serving
        self.transport: asyncio.Transport | None = None
        # None for an HTTP/2 stream's connection: its requests come parsed (stream_request).
        self.parser = httptools.HttpRequestParser(self) if parse else None
        # The HTTP/2 stream this connection serves, which takes its answers as parsed.
        self.stream: H2Stream | None = None
        self.parsing: Exchange | None = None
        self.active: Exchange | None = None
        self.pipeline: deque[Exchange] = deque()
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        # Raw bytes of the head being received, counted while in_head (first byte to its end),
        # and likewise of a chunk-size line or a trailer section while in_frame.
        self.head_bytes = 0
        self.in_head = False
        self.in_frame = False
        self.trailers = 0
        # Bytes read but not parsed yet (from held_at on), while a complete request waits
        # behind the active one: at most one read, since reading is paused meanwhile.
        self.held: bytes | None = None
        self.held_at = 0
        self.paused = 0
        self.write_paused = False
        self.closing = False
        self.closed = False
        # No request completed yet: only now may the HTTP/2 preface come (RFC 9113 §3.4).
        self.fresh = True
        # The parser is between two messages: the next piece fed starts the next one (see
        # _version). `feeding` is that piece while it is fed, `line` the piece where the message
        # under way began (at line_at), until its head is complete.
        self.between = True
        self.feeding: bytes | None = None
        self.feeding_at = 0
        self.line: bytes | None = None
        self.line_at = 0
        self.deadline = 0.0
        self.tunnel: UpstreamConnection | None = None
        self.tunnel_exchange: Exchange | None = None
        self.peer_ip = b""
        self.scheme = b"http"
        # X-Forwarded-For and -Proto lines of a request that brought no X-Forwarded-For.
        self.forwarded = b""
        self.task: asyncio.Task[None] | None = None
        self.idle_since = 0.0
        # When the active exchange's response head is due (0: not awaited), and the one timer
        # that watches it: re-armed when it fires early, never cancelled per request.
        self.head_deadline = 0.0
        self.head_timer: asyncio.TimerHandle | None = None
        self.head_timer_at = 0.0
        # Inactivity bounds (timeouts.client_body and the like) cost the hot path a counter
        # bump per read or write batch on each side; the proxy's tick watches the counter of
        # the phase under way and ends the exchange when it stood still for that phase's bound.
        self.client_progress = 0
        self.upstream_progress = 0
        self.watch_phase: Phase | None = None
        self.watch_count = 0
        self.watch_buffer = 0
        self.watch_since = 0.0
        self.tunnel_eof = 0

    # asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer_ip = str(peer[0]).encode("latin-1")
        proxy = self.proxy
        h2 = False
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = b"https"
            ssl_object = transport.get_extra_info("ssl_object")
            h2 = ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2"
        self.forwarded = b"X-Forwarded-For: %b\r\nX-Forwarded-Proto: %b\r\n" % (
            self.peer_ip,
            self.scheme,
        )
        if len(self.serving.connections) >= self.serving.settings.max_connections:
            # Refused at once rather than queued: the client learns to back off.
            self.transport.write(TOO_MANY_CONNECTIONS)
            self.transport.close()
            self.closed = True
            return
        if h2:
            self.closed = True  # the HTTP/2 session takes the connection (ALPN said so)
            proxy.start_session(self.transport, b"")
            return
        self.serving.connections.add(self)
        self.idle_since = proxy.loop.time()
        # Until a whole request head has arrived the client has request_headers to send it.
        self.deadline = proxy.loop.time() + self.serving.settings.request_headers_timeout
        if self.serving.shutting_down:
            self.closing = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.serving.connections.discard(self)
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            tunnel.close()
        for ex in (self.active, self.tunnel_exchange):
            if ex is not None:
                ex.client_lost()
        self.pipeline.clear()
        self.held = None

    def data_received(self, data: bytes) -> None:
        self.client_progress += 1
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.write(data)
            ex = self.tunnel_exchange
            if ex is not None:
                ex.body_size += len(data)  # the tunnel's bytes in, for the access log
            return
        ex = self.tunnel_exchange
        if ex is not None and ex.upgrade_rest is not None:
            # The upgrade is not confirmed yet; hold what the client sent meanwhile.
            ex.body_size += len(data)
            ex.upgrade_rest.append(data)
            self.pause_reading(self.PAUSE_TUNNEL)
            return
        held = self.held
        if held is not None:
            # Reading is paused while bytes are held; a read that was under way joins them.
            self.held = None
            data = held[self.held_at :] + data
        if self.fresh and len(data) < len(h.H2_PREFACE) and h.H2_PREFACE.startswith(data):
            # The HTTP/2 preface in pieces: llhttp must see it whole to stop at it.
            self.held = data
            self.held_at = 0
            return
        self._parse(data, 0)

    def _parse(self, data: bytes, pos: int) -> None:
        """Parse data[pos:], but never past a complete request queued behind the active one:
        a client pipelining without reading would make each read thousands of exchanges. The
        rest is held (reading stays paused) until the queue drains."""
        start, end = pos, len(data)
        while True:
            if self.pipeline and self.parsing is None:
                self.held = data
                self.held_at = pos
                return
            cut = self._request_end(data, pos)
            if self.in_head or self.in_frame:
                self.head_bytes += cut - pos
            parser = self.parser
            if parser is None:
                return  # a stream's connection is given requests, never bytes
            first = data[pos]
            if self.between and first != 13 and first != 10:
                self.feeding = data
                self.feeding_at = pos
            try:
                parser.feed_data(data if pos == 0 and cut == end else memoryview(data)[pos:cut])
            except httptools.HttpParserUpgrade as exc:
                self._on_upgrade(data[pos + exc.args[0] :])
                return
            except httptools.HttpParserError as exc:
                # httptools re-raises a callback's exception as the context of its own error.
                cause = exc.__context__
                if isinstance(cause, HeadError):
                    self._reject(cause.status, cause.detail)
                elif data.startswith(h.H2_PREFACE_LINE, start):
                    if self.fresh and self.active is None:
                        # llhttp stops at the preface's second line: what to hand over starts
                        # where this parse did.
                        self._become_h2(data[start:] if start else data)
                    else:
                        self._reject(400, "an HTTP/2 preface may only open a connection")
                elif data.startswith(b"PRI ", start):
                    self._reject(400, "PRI is the HTTP/2 preface's method; this is not one")
                else:
                    self._reject(400, str(exc) or "malformed request")
                return
            self.feeding = None
            # A phase that began during this piece restarted the count: head_bytes holds only
            # pieces that were wholly inside the head (or chunk framing) still under way.
            if self.in_head:
                if self.head_bytes > self.serving.settings.max_head_bytes:
                    # A header that never ends reaches no callback, so its size is bounded here.
                    self._reject(431, "request header fields too large")
                    return
                if not self.deadline:
                    # A head begun in this read has request_headers to arrive whole. Set here,
                    # not per message: most heads arrive whole in the read that began them.
                    proxy = self.proxy
                    self.deadline = (
                        proxy.loop.time() + self.serving.settings.request_headers_timeout
                    )
            elif self.in_frame and self.head_bytes > h.MAX_CHUNK_FRAMING:
                # A chunk extension or a trailer field that never ends reaches no callback.
                self._reject(400, "chunk size line or trailer section too large")
                return
            if cut == end:
                return
            pos = cut

    def _request_end(self, data: bytes, pos: int) -> int:
        """How far data[pos:] may be parsed at once without passing the end of the request
        under way: to the end of a body of known length, else to the next blank line (every
        head and every chunked body ends with one). One read is almost always one piece."""
        ex = self.parsing
        first = data[pos]
        if ex is not None and not ex.head.chunked:
            left = ex.head.content_length - ex.body_size
            if left > 0:
                return min(pos + left, len(data))
        if first == 10 or first == 13:
            # A blank line the previous read began may end here: one byte at a time.
            return pos + 1
        if ex is not None and ex.head.chunked and first != 48:
            # In a chunked body the blank line that ends it follows the last chunk's line
            # ("0" after a line break): blank lines in the data before it are passed over.
            last = data.find(b"\n0", pos)
            if last < 0:
                return len(data)
            pos = last
        blank = data.find(b"\r\n\r\n", pos)
        return len(data) if blank < 0 else blank + 4

    def _parse_held(self) -> None:
        """The queue drained: parse what was held, then read again if nothing waits."""
        data = self.held
        if data is None or self.closed:
            return
        self.held = None
        self._parse(data, self.held_at)
        if self.held is None and not self.pipeline and not self.closing:
            self.resume_reading(self.PAUSE_PIPELINE)

    def eof_received(self) -> bool | None:
        """The client half-closed: a request it sent in full still gets its response, unless
        it still waits in an upstream's admission queue. A client that closed looks the same,
        and under overload abandoned requests would hold queue places that live clients need:
        such a request is dropped from the queue, as HAProxy's abortonclose does. Through a
        tunnel the half-close passes on to the upstream."""
        ex = self.active
        if ex is not None and ex.stage is Stage.QUEUED:
            self.closing = True  # nothing pipelined behind it is served either
            if self.task is not None:
                self.task.cancel()
            return None
        if self.tunnel_exchange is not None:
            return self._tunnel_eof(EOF_CLIENT)
        if ex is None or not ex.body_done or self.parsing is not None:
            return None  # nothing complete to answer: close now
        if not self.pipeline:
            self.closing = True
        return True  # keep the transport open for the response

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.active
        if ex is not None and ex.conn is not None:
            ex.conn.pause_reading()
        if self.tunnel is not None:
            self.tunnel.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.client_progress += 1
        ex = self.active
        if ex is not None and ex.conn is not None:
            ex.conn.resume_reading()
        if self.tunnel is not None:
            self.tunnel.resume_reading()

    # httptools callbacks ------------------------------------------------------

    def on_message_begin(self) -> None:
        self.between = False
        self.line = self.feeding
        self.line_at = self.feeding_at
        self.feeding = None
        self.url = b""
        self.headers = []
        self.head_size = 0
        self.head_bytes = 0
        self.in_head = True
        self.trailers = 0
        self.deadline = 0.0  # see data_received

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.serving.settings.max_target:
            raise HeadError(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.parsing is not None:
            # A trailer field of a chunked body: not forwarded; counted like the head's (their
            # size is bounded in _parse).
            self.trailers += 1
            if self.trailers > h.MAX_TRAILERS:
                raise HeadError(400, "too many trailer fields")
            return
        self.head_size += len(name) + len(value) + 4
        headers = self.headers
        headers.append((name, value))
        settings = self.serving.settings
        if self.head_size > settings.max_head or len(headers) > settings.max_headers:
            raise HeadError(431, "request header fields too large")

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None  # only a parser calls this
        self.deadline = 0.0
        self.in_head = False
        # A chunk-size line (or a body) comes next: counted until a body byte arrives.
        self.in_frame = True
        self.head_bytes = 0
        transport = self.transport
        if transport is None or transport.is_closing():
            # An exchange that finished earlier in this read closed the connection: what the
            # client pipelined behind it is not served.
            self.parsing = None
            return
        method = parser.get_method()
        ex = Exchange(
            self,
            method,
            self.url,
            self._version(parser, method),
            self.headers,
            parser.should_keep_alive(),
        )
        self.parsing = ex
        if self.active is None:
            self.active = ex
            if ex.error is not None or ex.upgrade or ex.head.chunked or ex.head.content_length:
                # A body streams to the upstream as it arrives, and an upgrade or a refusal
                # waits for the parser to stop: start after this read. A bodiless request
                # starts the moment its message is complete (on_message_complete).
                self.proxy.loop.call_soon(ex.start)
        else:
            self.pipeline.append(ex)
            self.pause_reading(self.PAUSE_PIPELINE)

    def _version(self, parser: httptools.HttpRequestParser, method: bytes) -> str:
        """The request's HTTP version. httptools formats it anew for each request (str.format:
        a twentieth of a request's instructions), so "1.1" is read from the request line
        itself when it can be: the message began where a piece began (the parser was between
        messages, no blank line first) and that piece holds the line whole, exactly as llhttp
        reported its parts. Anything else asks the parser."""
        line = self.line
        if line is not None:
            self.line = None
            url = self.url
            at = self.line_at
            space = at + len(method)
            end = space + 1 + len(url)
            # Slices and ==: bytes.startswith with an offset parses its arguments from a tuple.
            if (
                end + 11 <= len(line)
                and line[at:space] == method
                and line[space] == 32
                and line[space + 1 : end] == url
                and line[end : end + 11] == b" HTTP/1.1\r\n"
            ):
                return "1.1"
        return parser.get_http_version()

    def on_body(self, body: bytes) -> None:
        self.in_frame = False
        ex = self.parsing
        if ex is not None:
            ex.feed_body(body)

    def on_chunk_header(self) -> None:
        # The chunk's data follows, or after the last chunk the trailer section: counted
        # afresh until a body byte arrives.
        self.head_bytes = 0

    def on_chunk_complete(self) -> None:
        # The next chunk-size line, or the end of the body, follows.
        self.in_frame = True
        self.head_bytes = 0

    def on_message_complete(self) -> None:
        self.between = True
        self.line = None
        self.in_frame = False
        self.fresh = False
        ex = self.parsing
        if ex is not None:
            self.parsing = None
            ex.end_body()
            if ex is self.active and ex.stage is Stage.NEW and not ex.upgrade and ex.error is None:
                ex.start()

    def stream_request(
        self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], end: bool
    ) -> None:
        """An HTTP/2 stream's request, parsed by its codec: checked against the same limits
        as a parsed head, then served like one. Its body follows through feed_body and
        on_message_complete; `end` says there is none."""
        self.url = url
        self.deadline = 0.0
        settings = self.serving.settings
        if len(url) > settings.max_target:
            self._reject(414, "request target too long", method)
            return
        size = 0
        for name, value in headers:
            size += len(name) + len(value) + 4
        if size > settings.max_head or len(headers) > settings.max_headers:
            self._reject(431, "request header fields too large", method)
            return
        ex = Exchange(self, method, url, "1.1", headers, False)
        self.parsing = self.active = ex
        if end:
            self.on_message_complete()
        else:
            self.proxy.loop.call_soon(ex.start)

    def feed_body(self, data: bytes) -> None:
        ex = self.parsing
        if ex is not None:
            ex.feed_body(data)

    # upgrades -----------------------------------------------------------------

    def _become_h2(self, data: bytes) -> None:
        """The client opened with the HTTP/2 connection preface (h2c, prior knowledge)."""
        proxy = self.proxy
        transport = self.transport
        if not self.serving.settings.http2 or transport is None:
            self._reject(400, "HTTP/2 is not enabled on this listener (listen.http2)")
            return
        # This protocol hands its transport to the HTTP/2 session and hears nothing more.
        self.closed = True
        self.transport = None
        self.in_head = False
        self.deadline = 0.0
        self.serving.connections.discard(self)
        proxy.start_session(transport, data)

    def _on_upgrade(self, rest: bytes) -> None:
        ex = self.parsing or self.active
        self.parsing = None
        if ex is None or self.parser is None or self.parser.get_method() == b"CONNECT":
            self._reject(405, "CONNECT is not supported by a reverse proxy")
            return
        # The parser stops at an upgrade; this connection serves nothing after it.
        self.closing = True
        if ex.head.websocket:
            ex.upgrade_rest = [rest] if rest else []
            self.tunnel_exchange = ex
        elif ex.head.chunked or ex.head.content_length:
            ex.error = (400, "an upgrade request with a body is not supported")
        else:
            # Other upgrades (h2c and the like) are not relayed: forward as a plain request.
            ex.upgrade = False
        if not ex.body_done:
            ex.end_body()

    def start_tunnel(self, ex: Exchange, conn: UpstreamConnection, rest: bytes) -> None:
        """Both sides agreed to switch protocols: from now on bytes pass through as they are."""
        transport = self.transport
        if transport is None or self.closed:
            conn.close()
            ex.tunnel_closed()
            return
        conn.sink = None
        conn.tunnel = self
        self.tunnel = conn
        if rest:
            ex.bytes_out += len(rest)
            transport.write(rest)
        pending = ex.upgrade_rest or []
        ex.upgrade_rest = None
        for data in pending:
            conn.write(data)
        if self.tunnel_eof & EOF_CLIENT and not conn.write_eof():
            # The client finished sending before the upstream switched protocols, and the
            # half-close cannot be passed on (TLS).
            self.close()
        self.resume_reading(self.PAUSE_TUNNEL)
        self.serving.tunnels.add(self)

    def _tunnel_eof(self, end: int) -> bool | None:
        """One end of a tunnel finished sending: pass the half-close on and keep relaying the
        other way until that end finishes too (or tunnel_idle, or drain.timeout at shutdown).
        None closes the transport that reported it, and with it the other one."""
        self.tunnel_eof |= end
        if self.tunnel_eof == EOF_CLIENT | EOF_UPSTREAM:
            return None
        tunnel = self.tunnel
        if tunnel is None:
            return True  # the upgrade is not confirmed yet: start_tunnel passes it on
        if end == EOF_CLIENT:
            return True if tunnel.write_eof() else None
        transport = self.transport
        if transport is None or self.closed or not transport.can_write_eof():
            return None  # TLS cannot half-close
        transport.write_eof()
        return True

    # the tunnel's upstream end reports here ------------------------------------

    def upstream_eof(self) -> bool | None:
        return self._tunnel_eof(EOF_UPSTREAM)

    def upstream_pause(self) -> None:
        """The upstream's end of the tunnel takes no more for now: stop reading the client."""
        self.pause_reading(self.PAUSE_UPSTREAM)

    def upstream_resume(self) -> None:
        self.upstream_progress += 1
        self.resume_reading(self.PAUSE_UPSTREAM)

    # flow control -------------------------------------------------------------

    def pause_reading(self, reason: int) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume_reading(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    # responses ----------------------------------------------------------------

    def relay(self, data: bytes) -> None:
        """A tunnel's bytes from the upstream towards the client, counted for the access log."""
        ex = self.tunnel_exchange
        if ex is not None:
            ex.bytes_out += len(data)
        self.write(data)

    def write(self, data: bytes) -> None:
        """What the upstream sent (the proxy's own answers too) towards the client."""
        self.upstream_progress += 1
        transport = self.transport
        if transport is not None and not self.closed:
            transport.write(data)

    def send_error(
        self,
        ex: Exchange,
        status: int,
        error: str,
        detail: str,
        pool: str = "",
        upstream: str = "",
    ) -> None:
        close = self.closing or not ex.keep_alive or not ex.body_done or status == 400
        if ex.head.grpc:
            # A gRPC client reads only gRPC: a trailers-only answer with the status in it.
            body = b""
            head = h.grpc_error_head(status, error, detail, pool, close)
        else:
            body = ex.error_body(status, error, detail, pool, upstream)
            extra = b"Retry-After: 1\r\n" if status == 503 else b""
            head = b"%bContent-Type: application/json\r\nContent-Length: %d\r\n%b%b\r\n" % (
                h.status_line(status),
                len(body),
                extra,
                b"Connection: close\r\n" if close else b"",
            )
        ex.response_started = True
        ex.status = status
        if not ex.note:
            ex.note = error  # the access log's reason: the proxy answered, not an upstream
        if close:
            ex.resp_close = True
        if not ex.no_body:
            ex.bytes_out += len(body)
            head += body
        self.write(head)

    def _reject(self, status: int, detail: str, method: bytes = b"") -> None:
        """Answer a request the parser refused, then close: the stream is out of step."""
        self.closing = True
        self.deadline = 0.0  # answered once; the tick must not answer again while it closes
        self.pause_reading(self.PAUSE_PIPELINE)
        ex = self.parsing
        if ex is not None and ex is self.active and not ex.body_done:
            ex.body_error(detail)
            return
        if self.active is not None:
            return  # the request being served finishes, then the connection closes
        body = b'{"error": "%b", "status": %d, "detail": "%b"}\n' % (
            h.error_name(status).encode("latin-1"),
            status,
            detail.replace('"', "'").encode("latin-1", "replace"),
        )
        self.write(
            b"%bContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%b" % (h.status_line(status), len(body), body)
        )
        self._log_refused(status, detail, len(body), method)
        self.close()

    def _log_refused(self, status: int, detail: str, size: int, method: bytes) -> None:
        """An access log line for a request refused before it became an exchange: what of its
        head was read (the method once the request line was), the answer and why."""
        access = self.proxy.access_log
        if access is None or not access.wants():
            return
        if not method and self.url and self.parser is not None:
            method = self.parser.get_method()
        access.write(
            (
                time.time(),
                self.peer_ip,
                method,
                self.url,
                status,
                0,
                size,
                None,
                None,
                0,
                0.0,
                0.0,
                detail,
            )
        )

    def exchange_finished(self, ex: Exchange) -> None:
        if ex is self.tunnel_exchange:
            self.tunnel_exchange = None
            self.serving.tunnels.discard(self)
            self.close()
        self.active = None
        self.watch_phase = None
        if self.closed:
            return
        if ex.resp_close or self.closing or not ex.keep_alive or ex.error is not None:
            self.close()
            return
        if self.pipeline:
            nxt = self.pipeline.popleft()
            self.active = nxt
            # Not from here: a run of pipelined answers that need no upstream would recurse.
            loop = self.proxy.loop
            loop.call_soon(nxt.start)
            if not self.pipeline:
                if self.held is not None:
                    loop.call_soon(self._parse_held)  # which then reads again
                else:
                    self.resume_reading(self.PAUSE_PIPELINE)
            return
        proxy = self.proxy
        self.idle_since = proxy.loop.time()
        self.deadline = self.idle_since + self.serving.settings.idle_timeout

    def arm_head_deadline(self, timeout: float) -> None:
        """The active exchange's request went out whole: its response head is due within
        `timeout`. A request costs a float store; the timer is armed once and re-armed only
        when it fires before the deadline of the exchange active by then."""
        if self.head_deadline:
            return
        loop = self.proxy.loop
        deadline = loop.time() + timeout
        self.head_deadline = deadline
        timer = self.head_timer
        if timer is None or deadline < self.head_timer_at:
            if timer is not None:
                timer.cancel()  # a reload shortened the timeout
            self.head_timer = loop.call_at(deadline, self._head_due)
            self.head_timer_at = deadline

    def _head_due(self) -> None:
        self.head_timer = None
        deadline = self.head_deadline
        if not deadline or self.closed:
            return
        loop = self.proxy.loop
        if loop.time() < deadline:
            self.head_timer = loop.call_at(deadline, self._head_due)
            self.head_timer_at = deadline
            return
        self.head_deadline = 0.0
        ex = self.active
        if ex is not None:
            ex.head_timeout()

    def close(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            transport.close()

    def abort(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            transport.abort()

    def expire(self, now: float) -> None:
        """Called by the proxy's tick: idle keep-alive, a trickling request head, or an
        exchange or tunnel in which nothing moved for longer than its phase allows."""
        if self.active is not None:
            self._watch(now)
        elif self.deadline and now >= self.deadline:
            if self.in_head:
                self.proxy.observed.timeouts[Phase.REQUEST_HEADERS.value] += 1
                self._reject(408, "request head not received in time")
            else:
                self.close()

    def _watch(self, now: float) -> None:
        """Find the phase under way and what moves in it (a progress counter, or a write
        buffer that drains while reading is paused behind it); a phase that stood still since
        an earlier tick for its timeout ends. A count of -1 says the buffer is what moves."""
        ex = self.active
        transport = self.transport
        tunnel = self.tunnel
        if ex is None or transport is None or self.closed:
            return
        phase: Phase | None = None
        count = -1
        buffered = 0
        if tunnel is not None:
            phase = Phase.TUNNEL_IDLE
            count = self.client_progress + self.upstream_progress
        elif ex.conn is None:
            pass  # queued, connecting, or answered by the proxy: bounded elsewhere
        elif ex.response_started:
            if self.write_paused:
                phase = Phase.CLIENT_SEND
                buffered = transport.get_write_buffer_size()
            else:
                phase = Phase.UPSTREAM_BODY
                count = self.upstream_progress
        elif not ex.body_done:
            if self.paused & self.PAUSE_UPSTREAM:
                phase = Phase.UPSTREAM_BODY
                buffered = ex.conn.write_buffer_size()
            else:
                phase = Phase.CLIENT_BODY
                count = self.client_progress
        # else the response head is awaited: timeouts.response_headers
        if (
            phase is not self.watch_phase
            or count != self.watch_count
            or buffered != self.watch_buffer
        ):
            self.watch_phase = phase
            self.watch_count = count
            self.watch_buffer = buffered
            self.watch_since = now
            return
        if phase is None:
            return
        timeout = self.serving.settings.inactivity[phase]
        if now - self.watch_since < timeout:
            return
        self.watch_phase = None
        if tunnel is None:
            ex.stalled(phase, timeout)
            return
        self.proxy.observed.timeouts[phase.value] += 1
        ex.note = "tunnel_idle_timeout"
        # A peer that reads nothing would hold a graceful close open forever.
        if tunnel.write_buffer_size():
            tunnel.abort()
        else:
            tunnel.close()
        if transport.get_write_buffer_size():
            self.abort()
        else:
            self.close()

    def going_away(self) -> None:
        """Close a WebSocket tunnel politely: 1001 "going away" to both ends, then close."""
        tunnel = self.tunnel
        if tunnel is None:
            return
        # Never after a half-close was passed on: that end takes no more bytes.
        if not self.tunnel_eof & EOF_UPSTREAM:
            self.write(WS_GOING_AWAY_TO_CLIENT)
        if not self.tunnel_eof & EOF_CLIENT:
            tunnel.write(WS_GOING_AWAY_TO_UPSTREAM)
        tunnel.close()
        self.close()

    def shutdown(self, now: float) -> None:
        """Stop after the current request. An idle connection closes once it has been idle
        for SHUTDOWN_IDLE_GRACE: a client that is about to reuse it (its request may be on the
        wire already) is answered, with `Connection: close`, rather than cut."""
        self.closing = True
        if (
            self.active is None
            and self.tunnel is None
            and not self.in_head
            and now - self.idle_since >= SHUTDOWN_IDLE_GRACE
        ):
            self.close()

    def __repr__(self) -> str:
        state = "tunnel" if self.tunnel else ("busy" if self.active else "idle")
        held = len(self.held) - self.held_at if self.held is not None else 0
        return (
            f"<ClientConnection {self.peer_ip.decode()} {state} pipeline={len(self.pipeline)}"
            f" held={held}>"
        )
