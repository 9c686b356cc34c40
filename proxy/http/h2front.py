"""HTTP/2 from clients: h2c with prior knowledge and ALPN `h2`, each stream served by the
HTTP/1.1 data path.

Every stream becomes one request on an in-memory connection of the proxy's own (a
ClientConnection whose transport is the stream), handed over as the codec parsed it
(ClientConnection.stream_request). So split, stickiness, override, admission, breakers,
retries, shielding, analysis, the access log and metrics apply per stream exactly as they do
per HTTP/1.1 request, and the HTTP/1.1 path itself is unchanged. An upstream's answer comes
back as fields (the exchange calls hold_head, respond, respond_end); only the proxy's own
answers (errors, 100 Continue) come as HTTP/1.1 bytes, which a parser made on first use turns
into frames. A stream lets go of its references when it ends: nothing of it is left to the
cyclic garbage collector (python -m loadtests.bench --h2 measures the cost per stream).

Flow control runs end to end: a stream's request body is acknowledged (WINDOW_UPDATE) only
as the data path takes it, and a response stream whose client window is exhausted pauses
its upstream connection, so neither direction buffers more than a window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import httptools

from proxy.http import h2codec
from proxy.http import headers as h
from proxy.http.h2codec import (
    CodecError,
    DataReceived,
    ErrorCode,
    GoAwayReceived,
    RequestReceived,
    StreamClosed,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from proxy.http.server import SHUTDOWN_IDLE_GRACE, ClientConnection

if TYPE_CHECKING:
    from proxy.runtime import Proxy

log = logging.getLogger("turnout.h2")

MAX_STREAMS = 100  # SETTINGS_MAX_CONCURRENT_STREAMS we announce
MAX_HEADER_LIST = 65536  # SETTINGS_MAX_HEADER_LIST_SIZE we announce and enforce
# A response stream queues at most this much beyond the client's window before its upstream
# connection is paused.
HIGH_WATER = 65536
# Client resets of unfinished streams: a bucket of RESET_BURST refilled at RESET_RATE a second.
# A client that cancels faster (rapid reset, CVE-2023-44487) is sent GOAWAY ENHANCE_YOUR_CALM.
RESET_BURST = 200.0
RESET_RATE = 100.0
LAST_STREAM = 2**31 - 1

# Response fields that are connection-specific in HTTP/1.1 and forbidden in HTTP/2.
CONNECTION_FIELDS = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
# Request fields not passed on as they came: HTTP/2 forbids the first ones, Host is made from
# :authority, and split cookies are joined.
DROPPED_REQUEST_FIELDS = frozenset((b"connection", b"keep-alive", b"te", b"host", b"cookie"))

# What may not appear in a request line or a Host field (the codecs pass them; llhttp would
# not), and a method that is not a token.
NOT_IN_LINE = re.compile(rb"[\x00-\x20\x7f]")
NOT_TOKEN = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")

VIA_FIELD = (b"via", h.VIA)

FLOW = 1  # the client's flow-control window is exhausted
TRANSPORT = 2  # the client connection's own write buffer is full


class H2Stream(asyncio.Transport):
    """One HTTP/2 stream: its request handed to the data path (an in-memory ClientConnection
    whose transport the stream is), the answer it gives sent as HTTP/2 frames."""

    __slots__ = (
        "blocked",
        "client_done",
        "closing",
        "complete",
        "ended",
        "fields",
        "head_request",
        "held",
        "held_end",
        "in_trailers",
        "internal",
        "parser",
        "reading_paused",
        "session",
        "stream_id",
        "trailers",
        "unacked",
    )

    def __init__(self, session: H2Session, stream_id: int, head_request: bool) -> None:
        # asyncio.Transport.__init__ is not called: it only keeps `extra`, which
        # get_extra_info below does not use.
        self.session = session
        self.stream_id = stream_id
        self.head_request = head_request
        self.internal = ClientConnection(session.proxy, parse=False)
        self.internal.stream = self
        # For what the data path writes as HTTP/1.1 bytes (its own errors, 100 Continue);
        # made on the first such write, dropped when the stream is done (it refers back).
        self.parser: httptools.HttpResponseParser | None = None
        # An upstream's answer comes as fields (hold_head, respond, respond_end): the head
        # is held until the read that brought it is over, as the HTTP/1.1 path holds it.
        self.held: list[tuple[bytes, bytes]] | None = None
        self.held_end = False
        self.fields: list[tuple[bytes, bytes]] = []
        self.in_trailers = False  # the response's head is done: fields now are trailers
        self.trailers: list[tuple[bytes, bytes]] = []
        self.blocked = 0
        self.reading_paused = False
        self.unacked = 0
        self.closing = False  # the data path closed its connection (the transport's state)
        self.client_done = False  # the request's END_STREAM came
        self.complete = False  # the response message is whole (maybe not all sent yet)
        self.ended = False  # END_STREAM or RST_STREAM sent: nothing more goes out

    # the transport of the in-memory connection ---------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return default  # the stream is HTTP/1.1 to the data path, whatever ALPN said
        return self.session.extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview[Any]) -> None:
        if not self.closing:
            self.response_bytes(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.session.loop.call_soon(self.internal_closed)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.resume_body()

    def get_write_buffer_size(self) -> int:
        return self.session.queued(self.stream_id)

    # request side ---------------------------------------------------------------

    def begin(
        self, method: bytes, path: bytes, fields: list[tuple[bytes, bytes]], end_stream: bool
    ) -> None:
        internal = self.internal
        internal.connection_made(self)
        if self.session.transport_blocked:
            self.block(TRANSPORT)
        self.client_done = end_stream
        internal.stream_request(method, path, fields, end_stream)

    def body(self, data: bytes, flow_length: int) -> None:
        if self.closing:
            self.session.acknowledge(self.stream_id, flow_length)
            return
        if data:
            self.internal.feed_body(data)
        if self.reading_paused:
            self.unacked += flow_length
        else:
            self.session.acknowledge(self.stream_id, flow_length)

    def end_body(self) -> None:
        if not self.client_done:
            self.client_done = True
            if not self.closing:
                self.internal.on_message_complete()

    def resume_body(self) -> None:
        self.reading_paused = False
        if self.unacked:
            unacked, self.unacked = self.unacked, 0
            self.session.acknowledge(self.stream_id, unacked)
            self.session.flush()

    def reset_by_client(self) -> None:
        self.ended = True
        if not self.closing:
            self.closing = True
            self.internal.connection_lost(ConnectionResetError("stream reset by the client"))
            self.release()

    # response side ----------------------------------------------------------------

    def response_bytes(self, data: bytes) -> None:
        if self.complete or self.ended:
            return
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpResponseParser(self)
        try:
            parser.feed_data(data)
        except httptools.HttpParserError:
            log.error("unparsable response from the data path on stream %d", self.stream_id)
            self.reset(ErrorCode.INTERNAL_ERROR)
            return
        self.session.flush()

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name not in CONNECTION_FIELDS:
            (self.trailers if self.in_trailers else self.fields).append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None  # only the parser calls this
        status = parser.get_status_code()
        if status < 200:
            self.fields = []  # an interim answer (100 Continue): HTTP/2 clients need none
            return
        fields = [(b":status", b"%d" % status), *self.fields]
        self.fields = []
        self.in_trailers = True
        no_body = self.head_request or status in (204, 304) or trailers_only(fields)
        self.session.send_headers(self.stream_id, fields, no_body)
        if no_body:
            self.complete = self.ended = True

    def on_body(self, body: bytes) -> None:
        if not self.ended:
            self.session.send_data(self, body)

    def on_message_complete(self) -> None:
        parser = self.parser
        assert parser is not None  # only the parser calls this
        if parser.get_status_code() < 200 or self.ended:
            return
        self.complete = self.ended = True
        self.session.end_stream(self.stream_id, self.trailers)

    def hold_head(
        self, status: int, runs: list[bytes], length: bytes | None, no_body: bool
    ) -> None:
        """An upstream's answer head (`no_body`: HEAD, 204, 304), with Via and the length the
        data path relays."""
        fields = h2_fields(runs, [(b":status", b"%d" % status)])
        fields.append(VIA_FIELD)
        if length is not None:
            fields.append((b"content-length", length))
        self.held = fields
        self.held_end = no_body or (length == b"0" and trailers_only(fields))

    def drop_head(self) -> None:
        """The held head is not sent after all (the answer turned out invalid first)."""
        self.held = None

    def respond(self, out: list[bytes]) -> bool:
        """Send the held head and the body data in `out`; whether there was any."""
        fields = self.held
        if fields is None and not out:
            return False
        session = self.session
        if fields is not None:
            self.held = None
            if not self.ended:
                end = self.held_end
                session.send_headers(self.stream_id, fields, end)
                if end:
                    self.complete = self.ended = True
        if out and not self.ended:
            session.send_data(self, out[0] if len(out) == 1 else b"".join(out))
        session.flush()
        return True

    def respond_end(self, runs: list[bytes] | None) -> None:
        """The answer is whole: end the stream, with the upstream's trailers if any."""
        if self.ended:
            return
        self.complete = self.ended = True
        self.session.end_stream(self.stream_id, [] if runs is None else h2_fields(runs, []))

    def block(self, reason: int) -> None:
        was = self.blocked
        self.blocked |= reason
        if not was and not self.closing:
            self.internal.pause_writing()

    def unblock(self, reason: int) -> None:
        if self.blocked & reason:
            self.blocked &= ~reason
            if not self.blocked and not self.closing:
                self.internal.resume_writing()

    def reset(self, code: int) -> None:
        if not self.ended:
            self.ended = True
            self.session.reset_stream(self.stream_id, code)
        self.abort()

    def internal_closed(self) -> None:
        """The data path is done with this stream's connection."""
        self.internal.connection_lost(None)
        if not self.complete and not self.ended:
            # A response cut short (or never given): the client must not take it as whole.
            self.ended = True
            self.session.reset_stream(self.stream_id, ErrorCode.INTERNAL_ERROR)
        self.session.stream_closed(self)
        self.release()

    def release(self) -> None:
        """Break the stream's reference cycles (its parser's callbacks, its connection's
        transport) so that reference counting frees it: one stream per request would
        otherwise keep the cyclic garbage collector busy."""
        self.parser = None
        self.held = None
        internal = self.internal
        internal.transport = None
        internal.stream = None


class H2Session:
    """One HTTP/2 client connection (the transport's protocol after the hand-over)."""

    def __init__(self, proxy: Proxy, transport: asyncio.Transport) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.transport = transport
        self.conn = h2codec.server(MAX_STREAMS, MAX_HEADER_LIST)
        self.streams: dict[int, H2Stream] = {}
        self.flow_blocked: set[H2Stream] = set()  # waiting for the client's window
        self.filling: set[H2Stream] = set()  # queued response data since the last write
        self.flushing = False  # a write is scheduled
        self.highest = 0  # the highest stream id the client opened
        self.extras: dict[str, Any] = {}  # the transport's extra info, as asked
        self.transport_blocked = False
        self.closed = False
        self.idle_since = self.loop.time()
        self.reset_tokens = RESET_BURST
        self.reset_at = self.idle_since
        self.shutdown_at = 0.0
        self.goaway_at = 0.0  # an announcing GOAWAY (no new streams) went out
        self.last_stream: int | None = None  # the final GOAWAY's last stream id

    # asyncio.Protocol -------------------------------------------------------------

    def start(self, data: bytes) -> None:
        self.transport.set_protocol(self)  # type: ignore[arg-type]
        self.proxy.serving.sessions.add(self)
        if data:
            self.data_received(data)
        else:
            self.flush()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # the hand-over gives the transport (start)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy.serving.sessions.discard(self)
        for stream in list(self.streams.values()):
            stream.reset_by_client()
        self.streams.clear()
        self.flow_blocked.clear()
        self.filling.clear()

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        self.transport_blocked = True
        for stream in self.streams.values():
            stream.block(TRANSPORT)

    def resume_writing(self) -> None:
        self.transport_blocked = False
        for stream in list(self.streams.values()):
            stream.unblock(TRANSPORT)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        try:
            conn.receive_data(data)
        except CodecError as exc:
            log.info("HTTP/2 connection error from %s: %s", self._peer(), exc)
            self.transport.write(h2codec.goaway_for(exc, self.highest))
            self.transport.close()
            self.connection_lost(None)
            return
        streams = self.streams
        for event in conn.events():
            if isinstance(event, DataReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.body(event.data, len(event.data))
                    if event.end_stream:
                        stream.end_body()
                else:
                    self.acknowledge(event.stream_id, len(event.data))
            elif isinstance(event, RequestReceived):
                self._request(event)
            elif isinstance(event, TrailersReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.end_body()
            elif isinstance(event, StreamReset):
                self._client_reset(event.stream_id)
            elif isinstance(event, StreamClosed):
                stream = streams.get(event.stream_id)
                if stream is not None and not stream.ended:
                    # Closed by the codec for the client's fault (a malformed request body).
                    del streams[event.stream_id]
                    stream.reset_by_client()
            elif isinstance(event, WindowUpdated):
                self.flush()
            elif isinstance(event, GoAwayReceived):
                self.write_now()
                self.transport.close()
                self.closed = True
            if self.closed:
                return
        self.flush()

    # requests ---------------------------------------------------------------------

    def _request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        if self.last_stream is not None and stream_id > self.last_stream:
            # Sent after the final GOAWAY: not processed, so the client may retry it.
            self.reset_stream(stream_id, ErrorCode.REFUSED_STREAM)
            return
        self.highest = max(self.highest, stream_id)
        head = request_head(event.headers, event.end_stream)
        if head is None:
            self.reset_stream(stream_id, ErrorCode.PROTOCOL_ERROR)
            return
        method, path, fields = head
        stream = H2Stream(self, stream_id, method == b"HEAD")
        self.streams[stream_id] = stream
        stream.begin(method, path, fields, event.end_stream)

    def _client_reset(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        if not stream.complete:
            now = self.loop.time()
            self.reset_tokens = min(
                RESET_BURST, self.reset_tokens + (now - self.reset_at) * RESET_RATE
            )
            self.reset_at = now
            self.reset_tokens -= 1.0
            if self.reset_tokens < 0.0:
                log.warning("HTTP/2 client resets streams too fast; closing its connection")
                self.conn.send_goaway(
                    ErrorCode.ENHANCE_YOUR_CALM,
                    last_stream_id=self.highest,
                    debug_data=b"too many stream resets",
                )
                self.write_now()
                self.transport.close()
                self.closed = True
        stream.reset_by_client()

    # responses --------------------------------------------------------------------

    def send_headers(self, stream_id: int, fields: list[tuple[bytes, bytes]], end: bool) -> None:
        if self.closed:
            return
        try:
            self.conn.send_response(stream_id, fields, end_stream=end)
        except CodecError:
            return  # the stream was reset by the client meanwhile
        if end:
            self.flush()

    def send_data(self, stream: H2Stream, data: bytes) -> None:
        """Queue response bytes: the codec sends them as the client's window allows."""
        if self.closed:
            return
        try:
            self.conn.send_data(stream.stream_id, data)
        except CodecError:
            stream.ended = True
            return
        self.filling.add(stream)

    def end_stream(self, stream_id: int, trailers: list[tuple[bytes, bytes]]) -> None:
        """End the stream after what is queued, with the response's trailers if any."""
        if self.closed:
            return
        try:
            if trailers:
                self.conn.send_trailers(stream_id, trailers)
            else:
                self.conn.end_stream(stream_id)
        except CodecError:
            return  # the stream was reset by the client meanwhile
        self.flush()

    def queued(self, stream_id: int) -> int:
        """Response bytes the client's window still holds back on the stream."""
        return h2codec.queued(self.conn, stream_id)

    def reset_stream(self, stream_id: int, code: int) -> None:
        if self.closed:
            return
        with contextlib.suppress(CodecError):  # closed on both sides
            self.conn.reset_stream(stream_id, code)
        self.flush()

    def acknowledge(self, stream_id: int, length: int) -> None:
        if length and not self.closed:
            h2codec.acknowledge(self.conn, stream_id, length)

    def stream_closed(self, stream: H2Stream) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        self.flow_blocked.discard(stream)
        self.filling.discard(stream)
        self.flush()
        if not self.streams:
            self.idle_since = self.loop.time()
            if self.goaway_at:
                self._close_gracefully()

    def flush(self) -> None:
        """Send what the codec has, once this turn of the event loop is over: the frames of
        every stream that answered meanwhile go out in one write."""
        if not self.flushing and not self.closed:
            self.flushing = True
            self.loop.call_soon(self.write_now)

    def write_now(self) -> None:
        self.flushing = False
        if self.closed:
            return
        conn = self.conn
        data = conn.data_to_send()
        if data:
            self.transport.write(data)
        if not conn.want_read and not conn.want_write and self.last_stream is None:
            # A connection error: the codec sent GOAWAY with its code.
            log.info("HTTP/2 connection error from %s; connection closed", self._peer())
            self.transport.close()
            self.closed = True
            return
        # A stream whose answer outruns the client's window pauses its upstream side.
        if self.filling:
            for stream in self.filling:
                if not stream.ended and self.queued(stream.stream_id) > HIGH_WATER:
                    stream.block(FLOW)
                    self.flow_blocked.add(stream)
            self.filling.clear()
        if self.flow_blocked:
            for stream in list(self.flow_blocked):
                if (stream.ended and not stream.complete) or self.queued(
                    stream.stream_id
                ) <= HIGH_WATER:
                    self.flow_blocked.discard(stream)
                    stream.unblock(FLOW)

    def extra_info(self, name: str, default: Any) -> Any:
        """The connection's transport's extra info, asked once per connection."""
        try:
            return self.extras[name]
        except KeyError:
            value = self.extras[name] = self.transport.get_extra_info(name, default)
            return value

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername")
        return str(peer[0]) if isinstance(peer, tuple) else "?"

    # the proxy's tick and shutdown --------------------------------------------------

    def expire(self, now: float) -> None:
        if not self.streams and now - self.idle_since >= self.proxy.serving.settings.idle_timeout:
            self._close_gracefully()

    def shutdown(self, now: float) -> None:
        """Drain: close once no stream is in flight and none came for SHUTDOWN_IDLE_GRACE (as
        idle HTTP/1.1 connections do), serving the streams that still come meanwhile. GOAWAY
        goes out only then, naming the last stream served: clients on h2's state machine
        (httpx) fail every stream still open when one arrives. A connection never idle by half
        of drain.timeout is sent the announcing GOAWAY of RFC 9113 §6.8 (no new streams)."""
        if self.closed or self.last_stream is not None:
            return
        if not self.shutdown_at:
            self.shutdown_at = now
        if not self.streams and now - self.idle_since >= SHUTDOWN_IDLE_GRACE:
            self._close_gracefully()
        elif not self.goaway_at and (
            now - self.shutdown_at >= self.proxy.serving.settings.drain_timeout / 2
        ):
            self.goaway_at = now
            self.conn.send_shutdown_notice()
            self.flush()

    def _close_gracefully(self) -> None:
        if self.last_stream is None and not self.closed:
            self.last_stream = self.highest
            with contextlib.suppress(CodecError):
                self.conn.send_goaway(last_stream_id=self.highest)
            self.write_now()
            self.transport.close()

    def abort(self) -> None:
        self.transport.abort()


def h2_fields(runs: list[bytes], into: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """HTTP/1.1 fields laid out as (name, b": ", value, CRLF) runs, appended to `into` as
    HTTP/2 fields: names lowercased, those HTTP/2 forbids left out."""
    for i in range(0, len(runs), 4):
        name = runs[i].lower()
        if name not in CONNECTION_FIELDS:
            into.append((name, runs[i + 2]))
    return into


def trailers_only(fields: list[tuple[bytes, bytes]]) -> bool:
    """A gRPC status in an empty answer's head: trailers-only, one HEADERS that ends it."""
    return (b"content-length", b"0") in fields and any(name == b"grpc-status" for name, _ in fields)


def request_head(
    fields: Iterable[tuple[bytes, bytes]], end_stream: bool
) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None:
    """(method, path, fields) of an HTTP/2 request as the data path takes a request head, or
    None for one that cannot be served (a missing pseudo-header, a method, target, authority
    or content-length that would not parse as HTTP/1.1). A body without a length is
    marked chunked, as the HTTP/1.1 upstreams it may go to need. Both codecs refuse fields
    with bytes HTTP/1.1 forbids (CR, LF, NUL) and names that are not lowercase tokens:
    libnghttp2 resets the stream, h2 ends the connection."""
    method = path = authority = b""
    head: list[tuple[bytes, bytes]] = [(b"host", b"")]
    cookies: list[bytes] = []
    length = False
    for name, value in fields:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue
        if name in DROPPED_REQUEST_FIELDS:
            if name == b"cookie":
                cookies.append(value)  # HTTP/2 may split cookies into fields (RFC 9113 §8.2.3)
            elif name == b"host" and not authority:
                authority = value
            continue
        if name == b"content-length":
            if not value.isdigit():
                return None
            length = True
        head.append((name, value))
    if (
        not method
        or not path
        or NOT_TOKEN.search(method) is not None
        or NOT_IN_LINE.search(path) is not None
        or NOT_IN_LINE.search(authority) is not None
    ):
        return None
    if authority:
        head[0] = (b"host", authority)
    else:
        del head[0]
    if cookies:
        head.append((b"cookie", b"; ".join(cookies)))
    if not end_stream and not length:
        head.append((b"transfer-encoding", b"chunked"))
    return method, path, head
