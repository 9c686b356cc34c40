"""HTTP/2 towards upstreams (`pools.<pool>.protocol: h2c | h2`): a few multiplexed connections
per upstream, each carrying many requests at once.

The data path speaks HTTP/1.1 to an upstream connection. For an HTTP/2 pool each of its
UpstreamConnections is virtual: its transport (a StreamTransport) reads the HTTP/1.1 request
it is given and opens one stream for it on a shared HTTP/2 connection (an H2Link), and hands
the stream's answer to it as the codec parsed it (head, data, trailers: the calls llhttp's
callbacks make for an HTTP/1.1 answer; one of unknown length is taken as chunked). A virtual
connection is pooled and reused like a real one; each request on it is a new stream. So
limits, breakers, retries, shielding and analysis treat an HTTP/2 upstream exactly as any
other, and a GOAWAY, a reset or a lost connection reach the data path as the connection
faults it already handles.

Flow control runs end to end: a response stream's data is acknowledged only while the client
side reads (the data path pauses its upstream connection otherwise), and a request body waits
for the upstream's window, pausing the client side when too much is held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import httptools

from proxy.http import h2codec
from proxy.http.h2codec import (
    CodecError,
    DataReceived,
    ErrorCode,
    GoAwayReceived,
    ResponseReceived,
    Setting,
    StreamClosed,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from proxy.http.upstream import ConnectError, UpstreamConnection

if TYPE_CHECKING:
    from proxy.http.upstream import Upstream

log = logging.getLogger("turnout.h2upstream")

# Request fields that are connection-specific in HTTP/1.1 and forbidden in HTTP/2 (`host`
# becomes :authority).
CONNECTION_FIELDS = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host")
)
HIGH_WATER = 65536  # request body held for the upstream's window before the client is paused
WINDOW = 1 << 20  # our receive window per stream and for the connection


class StreamTransport(asyncio.Transport):
    """The transport of one virtual upstream connection: one stream per request on a link."""

    def __init__(self, link: H2Link, conn: UpstreamConnection) -> None:
        super().__init__()
        self.link = link
        self.conn = conn
        self.parser = httptools.HttpRequestParser(self)
        self.closing = False
        self.stream_id = 0  # the stream of the request under way (0: none)
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.blocked = False  # the request body waits for the upstream's window
        self.request_done = False
        self.paused = False  # the data path does not read (its client is slow)
        self.unacked = 0

    # what the UpstreamConnection calls -------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.link.transport.get_extra_info(name, default) if self.link.transport else default

    def write(self, data: bytes | bytearray | memoryview[Any]) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(bytes(data))
        except httptools.HttpParserError as exc:
            log.error("unparsable request from the data path: %s", exc)
            self.abort()
        self.link.flush()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.link.detach(self)
            self.link.loop.call_soon(self.conn.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        if self.unacked:
            unacked, self.unacked = self.unacked, 0
            self.link.acknowledge(self.stream_id, unacked)
            self.link.flush()

    def get_write_buffer_size(self) -> int:
        return self.link.queued(self.stream_id) if self.stream_id else 0

    # httptools callbacks: the HTTP/1.1 request, turned into a stream --------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.fields = []
        self.request_done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        authority = b""
        fields: list[tuple[bytes, bytes]] = []
        grpc = False
        for name, value in self.fields:
            if name == b"host":
                authority = value
            elif name not in CONNECTION_FIELDS:
                if name == b"content-type" and value.startswith(b"application/grpc"):
                    grpc = True
                if name != b"te":
                    fields.append((name, value))
        method = self.parser.get_method()
        head = [
            (b":method", method),
            (b":scheme", self.link.scheme),
            (b":authority", authority or self.link.authority),
            (b":path", self.url),
        ]
        if grpc:
            head.append((b"te", b"trailers"))  # gRPC servers require it (hop-by-hop in 1.1)
        self.stream_id = self.link.open_stream(self, head + fields)

    def on_body(self, body: bytes) -> None:
        if self.stream_id:
            self.link.send_data(self, body)

    def on_message_complete(self) -> None:
        self.request_done = True
        if self.stream_id:
            self.link.end_request(self)

    def block(self) -> None:
        if not self.blocked:
            self.blocked = True
            self.conn.pause_writing()

    def unblock(self) -> None:
        if self.blocked:
            self.blocked = False
            self.conn.resume_writing()

    # the stream's answer, handed to the data path as parsed ------------------------------

    def response(self, fields: Iterable[tuple[bytes, bytes]], ended: bool) -> None:
        if not self.closing:
            self.conn.stream_head(fields, ended)

    def data(self, data: bytes, flow_length: int) -> None:
        if data and not self.closing:
            self.conn.stream_body(data)
        if self.paused:
            self.unacked += flow_length
        else:
            self.link.acknowledge(self.stream_id, flow_length)

    def trailers(self, fields: Iterable[tuple[bytes, bytes]]) -> None:
        if not self.closing:
            self.conn.stream_trailers(fields)

    def ended(self) -> None:
        self.stream_id = 0
        if not self.closing:
            self.conn.stream_end()

    def reset(self, reason: str) -> None:
        """The stream or its connection failed: this virtual connection fails with it."""
        if not self.closing:
            self.closing = True
            self.stream_id = 0
            self.link.detach(self)
            self.conn.connection_lost(ConnectionResetError(reason))


class H2Link:
    """One HTTP/2 connection to an upstream (an asyncio protocol), shared by the virtual
    connections attached to it."""

    def __init__(self, mux: H2Upstream) -> None:
        self.mux = mux
        self.loop = mux.loop
        self.scheme = mux.scheme
        self.authority = mux.authority
        self.transport: asyncio.Transport | None = None
        self.h2 = h2codec.client(WINDOW)
        self.attached: set[StreamTransport] = set()
        self.streams: dict[int, StreamTransport] = {}
        self.blocked: set[StreamTransport] = set()  # request bodies waiting for a window
        self.filling: set[StreamTransport] = set()  # queued request body since the last write
        self.flushing = False  # a write is scheduled
        self.closed = False
        self.draining = False  # the upstream sent GOAWAY: no new streams here

    @property
    def capacity(self) -> int:
        if self.closed or self.draining:
            return 0
        limit = self.h2.remote_settings.get(Setting.MAX_CONCURRENT_STREAMS, 100)
        return limit - len(self.attached)

    # asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.mux.forget(self)
        reason = f"upstream connection lost: {exc}" if exc else "upstream closed the connection"
        for stream in list(self.attached):
            stream.reset(reason)
        self.blocked.clear()

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        for stream in self.attached:
            stream.conn.pause_writing()

    def resume_writing(self) -> None:
        for stream in list(self.attached):
            stream.conn.resume_writing()

    def data_received(self, data: bytes) -> None:
        conn = self.h2
        try:
            conn.receive_data(data)
        except CodecError as exc:
            log.warning("HTTP/2 protocol error from upstream %s: %s", self.mux.key, exc)
            if self.transport is not None:
                self.transport.write(h2codec.goaway_for(exc, 0))
                self.transport.close()
            self.connection_lost(exc)
            return
        streams = self.streams
        for event in conn.events():
            if isinstance(event, DataReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.data(event.data, len(event.data))
                    if event.end_stream:
                        self._ended(event.stream_id)
                else:
                    self.acknowledge(event.stream_id, len(event.data))
            elif isinstance(event, ResponseReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.response(event.headers, event.end_stream)
                    if event.end_stream:
                        self._ended(event.stream_id)
            elif isinstance(event, TrailersReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.trailers(event.headers)
                    self._ended(event.stream_id)
            elif isinstance(event, StreamReset | StreamClosed):
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    stream.reset(f"upstream reset the stream (code {event.error_code})")
            elif isinstance(event, WindowUpdated):
                pass  # the blocked request bodies are looked at below
            elif isinstance(event, GoAwayReceived):
                self._goaway(event.last_stream_id)
        self.flush()
        if not conn.want_read and not conn.want_write and not self.closed:
            log.warning("HTTP/2 protocol error from upstream %s; connection closed", self.mux.key)
            self.close()

    def _ended(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream.ended()

    def _goaway(self, last_stream_id: int) -> None:
        """The upstream drains this connection: streams past `last_stream_id` were not
        processed (their virtual connections fail as a reset the data path may retry), the
        others finish; new requests go to a new connection."""
        self.draining = True
        self.mux.forget(self)
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last_stream_id:
                del self.streams[stream_id]
                stream.reset("upstream sent GOAWAY before this stream")
        for stream in list(self.attached):
            if not stream.stream_id:
                stream.reset("upstream connection draining")
        if not self.streams:
            self.close()

    # what the virtual connections call --------------------------------------------

    def open_stream(self, stream: StreamTransport, fields: list[tuple[bytes, bytes]]) -> int:
        if self.closed or self.draining:
            stream.reset("upstream connection draining")
            return 0
        try:
            stream_id = self.h2.send_request(fields)
        except CodecError as exc:
            stream.reset(f"cannot open a stream: {exc}")
            return 0
        self.streams[stream_id] = stream
        return stream_id

    def send_data(self, stream: StreamTransport, data: bytes) -> None:
        """Queue request body bytes: the codec sends them as the upstream's window allows;
        beyond HIGH_WATER held back, the client side is paused."""
        if self.closed:
            return
        try:
            self.h2.send_data(stream.stream_id, data)
        except CodecError:
            return  # the stream was reset meanwhile; its reset event fails the request
        self.filling.add(stream)
        self.flush()

    def end_request(self, stream: StreamTransport) -> None:
        stream.request_done = False
        if not self.closed:
            try:
                self.h2.end_stream(stream.stream_id)
            except CodecError:
                return  # the stream was reset meanwhile; its reset event fails the request

    def queued(self, stream_id: int) -> int:
        return h2codec.queued(self.h2, stream_id)

    def acknowledge(self, stream_id: int, length: int) -> None:
        if length and not self.closed:
            h2codec.acknowledge(self.h2, stream_id, length)

    def detach(self, stream: StreamTransport) -> None:
        """A virtual connection closed: cancel its stream if one is open."""
        self.attached.discard(stream)
        self.blocked.discard(stream)
        self.filling.discard(stream)
        stream_id = stream.stream_id
        if stream_id and self.streams.get(stream_id) is stream:
            del self.streams[stream_id]
            with contextlib.suppress(CodecError):
                self.h2.reset_stream(stream_id, ErrorCode.CANCEL)
            self.flush()
        if not self.attached and (self.draining or not self.mux.keeps(self)):
            self.close()

    def flush(self) -> None:
        """Send what the codec has, once this turn of the event loop is over: the frames of
        every request made meanwhile go out in one write."""
        if not self.flushing and not self.closed:
            self.flushing = True
            self.loop.call_soon(self.write_now)

    def write_now(self) -> None:
        self.flushing = False
        if self.transport is None or self.closed:
            return
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)
        # A request body that outruns the upstream's window pauses its client side.
        if self.filling:
            for stream in self.filling:
                if stream.stream_id and self.queued(stream.stream_id) > HIGH_WATER:
                    stream.block()
                    self.blocked.add(stream)
            self.filling.clear()
        if self.blocked:
            for stream in list(self.blocked):
                if not stream.stream_id or self.queued(stream.stream_id) <= HIGH_WATER:
                    self.blocked.discard(stream)
                    stream.unblock()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.mux.forget(self)
            self.blocked.clear()
            self.filling.clear()
            if self.transport is not None:
                with contextlib.suppress(CodecError):
                    self.h2.send_goaway()
                data = self.h2.data_to_send()
                if data:
                    self.transport.write(data)
                self.transport.close()


class H2Upstream:
    """The HTTP/2 connections of one upstream: virtual connections attach to one with room
    (the upstream's SETTINGS_MAX_CONCURRENT_STREAMS), else to a new one."""

    def __init__(self, upstream: Upstream, loop: asyncio.AbstractEventLoop, tls: bool) -> None:
        self.upstream = upstream
        self.loop = loop
        self.key = upstream.key
        self.scheme = b"https" if tls else b"http"
        self.authority = upstream.host_header
        self.links: list[H2Link] = []
        self._connecting: asyncio.Task[H2Link] | None = None

    def keeps(self, link: H2Link) -> bool:
        """Whether an unused link stays open for the next requests (the newest one does)."""
        return bool(self.links) and self.links[-1] is link

    def forget(self, link: H2Link) -> None:
        if link in self.links:
            self.links.remove(link)

    async def attach(self, conn: UpstreamConnection, timeout: float) -> None:
        """Give `conn` a stream transport on a link with room, connecting one if needed."""
        while True:
            link = next((link for link in self.links if link.capacity > 0), None)
            if link is not None:
                break
            # Requests that find no room at once share one connect rather than open one each.
            connecting = self._connecting
            if connecting is None:
                connecting = self._connecting = asyncio.ensure_future(self._connect(timeout))
                connecting.add_done_callback(self._connected)
            await asyncio.shield(connecting)
        stream = StreamTransport(link, conn)
        link.attached.add(stream)
        conn.connection_made(stream)

    def _connected(self, task: asyncio.Task[H2Link]) -> None:
        self._connecting = None

    async def _connect(self, timeout: float) -> H2Link:
        upstream = self.upstream
        link = H2Link(self)
        await upstream.open(lambda: link, timeout)
        transport = link.transport
        if upstream.ssl is not None and transport is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                transport.close()
                raise ConnectError("the upstream did not agree to HTTP/2 (ALPN h2)")
        self.links.append(link)
        return link


GRPC_HEALTH_PATH = b"/grpc.health.v1.Health/Check"
PROBE_BODY_LIMIT = 65536  # a health answer's body kept (a gRPC health answer is 2 bytes)
GRPC_SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}, protobuf-encoded


def grpc_health_request(service: str) -> bytes:
    """HealthCheckRequest{service}, protobuf-encoded, in gRPC's length-prefixed framing."""
    name = service.encode()
    message = b"\x0a" + _varint(len(name)) + name if name else b""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


async def probe_h2(
    host: str,
    port: int,
    path: str,
    host_header: str,
    tls: ssl.SSLContext | None,
    grpc_service: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> tuple[bool, str]:
    """One request over a fresh HTTP/2 connection (the caller bounds the time): (ok, detail).
    A GET of `path`, ok iff the status is 200..399; or, with `grpc_service`, gRPC's
    grpc.health.v1.Health/Check, ok iff the service is SERVING."""
    head = [
        (b":scheme", b"https" if tls is not None else b"http"),
        (b":authority", host_header.encode("latin-1")),
    ]
    agent = (b"user-agent", b"turnout-health")
    extra = [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers]
    if grpc_service is None:
        head += [(b":method", b"GET"), (b":path", path.encode("latin-1")), agent, *extra]
        answer = await _one_request(host, port, tls, head, None)
        if isinstance(answer, str):
            return False, answer
        status = answer[0].get(b":status", b"0").decode("latin-1")
        return 200 <= int(status) <= 399, status
    head += [
        (b":method", b"POST"),
        (b":path", GRPC_HEALTH_PATH),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        agent,
        *extra,
    ]
    answer = await _one_request(host, port, tls, head, grpc_health_request(grpc_service))
    if isinstance(answer, str):
        return False, answer
    fields, body = answer
    code = fields.get(b"grpc-status", b"?").decode("latin-1")
    if code != "0":
        message = fields.get(b"grpc-message", b"").decode("latin-1")
        return False, f"grpc-status {code} {message}".rstrip()
    serving = body[5:] == GRPC_SERVING
    return serving, "SERVING" if serving else "NOT_SERVING"


async def _one_request(
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    head: list[tuple[bytes, bytes]],
    body: bytes | None,
) -> tuple[dict[bytes, bytes], bytes] | str:
    """One request on a fresh connection: the answer's head and trailers and its body, or
    why there is none. Without a request body only the head is awaited (a probe never reads
    an endless body)."""
    reader, writer = await asyncio.open_connection(
        host, port, ssl=tls, server_hostname=host if tls is not None else None
    )
    try:
        answer = await _exchange(reader, writer, head, body)
    except BaseException:
        # No await here: compiled by mypyc, an await while an exception is on its way out
        # loses it (mypyc/mypyc#1114), and a cancellation would be lost with it.
        writer.close()
        raise
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return answer


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    head: list[tuple[bytes, bytes]],
    body: bytes | None,
) -> tuple[dict[bytes, bytes], bytes] | str:
    """The request on an open connection, and its answer (as _one_request says)."""
    conn = h2codec.client(65535)
    stream_id = conn.send_request(head, end_stream=body is None)
    if body is not None:
        conn.send_data(stream_id, body, end_stream=True)
    writer.write(conn.data_to_send())
    fields: dict[bytes, bytes] = {}
    received = b""
    while data := await reader.read(65536):
        try:
            conn.receive_data(data)
        except CodecError as exc:
            return f"invalid HTTP/2 from the upstream: {exc}"
        for event in conn.events():
            if isinstance(event, ResponseReceived):
                fields.update(event.headers)
                if body is None or event.end_stream:
                    return fields, received
            elif isinstance(event, TrailersReceived):
                fields.update(event.headers)
                return fields, received
            elif isinstance(event, DataReceived):
                if len(received) < PROBE_BODY_LIMIT:
                    received += event.data
                conn.acknowledge_received_data(len(event.data), stream_id)
                if event.end_stream:
                    return fields, received
            elif isinstance(event, StreamReset | StreamClosed | GoAwayReceived):
                return "stream refused by the upstream"
        if not conn.want_read:
            return "invalid HTTP/2 from the upstream"
        writer.write(conn.data_to_send())
    return "connection closed before the answer"
