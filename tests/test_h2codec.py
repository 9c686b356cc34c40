"""The HTTP/2 codec differentially: libnghttp2 (ngh2, what Turnout runs) against h2 (the
reference), both behind proxy.http.h2codec. The same client bytes, cut into the same random
pieces, go into a server connection of each; what each reports must be the same, and the
answers each sends (through flow control: bodies beyond the windows, trailers, resets) must
read the same to a client. The proxy's end-to-end HTTP/2 tests run on both codecs too
(`TURNOUT_H2_CODEC=h2 pytest tests/test_http2.py ...` in CI)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.http import h2codec
from proxy.http.h2codec import (
    Codec,
    DataReceived,
    ErrorCode,
    RequestReceived,
    StreamReset,
    TrailersReceived,
)

CODECS = ("ngh2", "h2")


@dataclass
class Call:
    """One stream: what the client sends and what the server answers."""

    extra: list[tuple[bytes, bytes]]
    request_body: int
    request_trailers: bool
    status: int
    response_body: int
    response_trailers: bool
    client_resets: bool


@dataclass
class Seen:
    """What a server connection reported, per stream, in order."""

    heads: dict[int, tuple[tuple[bytes, bytes], ...]] = field(default_factory=dict)
    bodies: dict[int, bytes] = field(default_factory=dict)
    trailers: dict[int, tuple[tuple[bytes, bytes], ...]] = field(default_factory=dict)
    ended: set[int] = field(default_factory=set)
    resets: dict[int, int] = field(default_factory=dict)


def server_codec(name: str) -> Codec:
    h2codec.use(name)
    try:
        return h2codec.server(100, 65536)
    finally:
        h2codec.use("ngh2")


def client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    return conn


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given fractions' positions: the same pieces for both codecs."""
    at = sorted({int(c * len(data) / 1000) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(at) if b > a]


def take(codec: Codec, data: bytes, cuts: list[int], seen: Seen) -> None:
    for piece in pieces(data, cuts):
        codec.receive_data(piece)
        for event in codec.events():
            if isinstance(event, RequestReceived):
                seen.heads[event.stream_id] = tuple(event.headers)
                if event.end_stream:
                    seen.ended.add(event.stream_id)
            elif isinstance(event, DataReceived):
                seen.bodies[event.stream_id] = seen.bodies.get(event.stream_id, b"") + event.data
                codec.acknowledge_received_data(len(event.data), event.stream_id)
                if event.end_stream:
                    seen.ended.add(event.stream_id)
            elif isinstance(event, TrailersReceived):
                seen.trailers[event.stream_id] = tuple(event.headers)
                seen.ended.add(event.stream_id)
            elif isinstance(event, StreamReset):
                seen.resets[event.stream_id] = event.error_code


def request(call: Call, path: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST" if call.request_body else b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"shop"),
        (b":path", path),
        *call.extra,
    ]


def body(size: int, seed: int) -> bytes:
    return bytes((seed + i) % 251 for i in range(size))


def exchange(name: str, calls: list[Call], cuts: list[int]) -> tuple[Seen, dict[str, Any]]:
    """Run `calls` against a server connection on codec `name`: what the server saw, and what
    the client read back (per stream: status, body, trailers, how it ended)."""
    server = server_codec(name)
    peer = client()
    seen = Seen()
    take(server, peer.data_to_send(), cuts, seen)
    peer.receive_data(server.data_to_send())
    ids = []
    for n, call in enumerate(calls):
        stream_id = peer.get_next_available_stream_id()
        ids.append(stream_id)
        ends_here = not call.request_body and not call.request_trailers
        peer.send_headers(stream_id, request(call, b"/call/%d" % n), end_stream=ends_here)
        if call.request_body:
            data = body(call.request_body, n)
            for at in range(0, len(data), 16384):
                last = at + 16384 >= len(data)
                peer.send_data(
                    stream_id, data[at : at + 16384], end_stream=last and not call.request_trailers
                )
        if call.request_trailers:
            peer.send_headers(stream_id, [(b"x-checksum", b"%d" % n)], end_stream=True)
        if call.client_resets:
            peer.reset_stream(stream_id, ErrorCode.CANCEL)
    take(server, peer.data_to_send(), cuts, seen)
    for n, (stream_id, call) in enumerate(zip(ids, calls, strict=True)):
        if stream_id in seen.resets:
            continue
        ends_here = not call.response_body and not call.response_trailers
        server.send_response(stream_id, [(b":status", b"%d" % call.status)], end_stream=ends_here)
        if call.response_body:
            server.send_data(stream_id, body(call.response_body, 100 + n))
        if call.response_trailers:
            server.send_trailers(stream_id, [(b"grpc-status", b"0"), (b"grpc-message", b"")])
        elif not ends_here:
            server.end_stream(stream_id)
    read: dict[str, Any] = {}
    for _ in range(200):  # the answers go out as the client's windows open again
        out = server.data_to_send()
        if not out:
            break
        for event in peer.receive_data(out):
            key = str(getattr(event, "stream_id", 0))
            got = read.setdefault(key, {"head": None, "body": b"", "trailers": None, "end": ""})
            if isinstance(event, h2.events.ResponseReceived):
                got["head"] = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                got["body"] += event.data
                peer.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                got["trailers"] = dict(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                got["end"] = "ended"
            elif isinstance(event, h2.events.StreamReset):
                got["end"] = f"reset {int(event.error_code)}"
        take(server, peer.data_to_send(), [], seen)
    return seen, read


calls = st.builds(
    Call,
    extra=st.lists(
        st.tuples(
            st.sampled_from([b"x-user", b"content-type", b"grpc-timeout", b"x-trace"]),
            st.binary(min_size=0, max_size=40).map(lambda v: bytes(b % 26 + 97 for b in v)),
        ),
        max_size=4,
    ),
    request_body=st.sampled_from([0, 1, 100, 16384, 40000]),
    request_trailers=st.booleans(),
    status=st.sampled_from([200, 204, 404, 503]),
    response_body=st.sampled_from([0, 5, 16385, 70000, 200000]),
    response_trailers=st.booleans(),
    client_resets=st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(calls, min_size=1, max_size=4),
    st.lists(st.integers(min_value=0, max_value=1000), max_size=6),
)
def test_both_codecs_see_and_send_the_same(calls: list[Call], cuts: list[int]) -> None:
    # The request bodies stay within the connection's first window (65,535 bytes): the two
    # codecs credit windows back at different moments (libnghttp2 at half a window), which
    # is theirs to choose.
    while sum(c.request_body for c in calls) > 65535:
        calls = calls[:-1]
    seen_ngh2, read_ngh2 = exchange("ngh2", calls, cuts)
    seen_h2, read_h2 = exchange("h2", calls, cuts)
    assert seen_ngh2 == seen_h2
    assert read_ngh2 == read_h2
    for n, call in enumerate(calls):
        if call.client_resets or call.status == 204:
            continue
        assert read_ngh2[str(1 + 2 * n)]["body"] == body(call.response_body, 100 + n)


@pytest.mark.parametrize("name", CODECS)
def test_a_field_with_a_line_break_is_refused(name: str) -> None:
    server = server_codec(name)
    peer = client()
    server.receive_data(peer.data_to_send())
    peer.receive_data(server.data_to_send())
    fields = request(Call([], 0, False, 200, 0, False, False), b"/")
    peer.send_headers(1, [*fields, (b"x-a", b"1\r\nx-b: 2")], end_stream=True)
    server.receive_data(peer.data_to_send())
    assert not [e for e in server.events() if isinstance(e, RequestReceived)]
    (refusal,) = peer.receive_data(server.data_to_send())
    # libnghttp2 resets the stream (RFC 9113 §8.1.1), h2 ends the connection.
    if name == "ngh2":
        assert isinstance(refusal, h2.events.StreamReset)
        assert refusal.stream_id == 1
    else:
        assert isinstance(refusal, h2.events.ConnectionTerminated)
    assert refusal.error_code == ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize("name", CODECS)
def test_a_connection_error_is_a_goaway_and_the_end_of_reading(name: str) -> None:
    server = server_codec(name)
    peer = client()
    server.receive_data(peer.data_to_send())
    server.data_to_send()
    server.receive_data(b"\x00\x00\x01\x00\x01\x00\x00\x00\x00x")  # DATA on stream 0
    out = server.data_to_send()
    assert out[3] == 0x7  # GOAWAY
    assert int.from_bytes(out[13:17], "big") == ErrorCode.PROTOCOL_ERROR
    assert not server.want_read


@pytest.mark.parametrize("name", CODECS)
def test_data_beyond_the_window_waits_for_it(name: str) -> None:
    server = server_codec(name)
    peer = client()
    server.receive_data(peer.data_to_send())
    peer.receive_data(server.data_to_send())
    peer.send_headers(1, request(Call([], 0, False, 200, 0, False, False), b"/"), end_stream=True)
    server.receive_data(peer.data_to_send())
    server.events()
    server.send_response(1, [(b":status", b"200")])
    server.send_data(1, b"x" * 100000)
    server.end_stream(1)
    received = 0
    for event in peer.receive_data(server.data_to_send()):
        if isinstance(event, h2.events.DataReceived):
            received += len(event.data)
    assert received == 65535  # the client's first window, no more
    assert server.queued_body_size(1) == 100000 - 65535
    peer.increment_flow_control_window(100000)
    peer.increment_flow_control_window(100000, 1)
    server.receive_data(peer.data_to_send())
    events = peer.receive_data(server.data_to_send())
    received += sum(len(e.data) for e in events if isinstance(e, h2.events.DataReceived))
    assert received == 100000
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
    assert server.queued_body_size(1) == 0
