"""What the HTTP/2 codec costs Turnout per proxied gRPC unary call, by library.

    python -m loadtests.h2codec                  # h2, and jh2 / ngh2 when installed
    pip install jh2 ngh2                         # the candidates, not dependencies of Turnout

Four in-memory endpoints per run: a client, Turnout's two sides (the server side facing the
client, the client side facing the upstream) and the upstream. One call: the client sends
HEADERS and one DATA frame (a 5-byte gRPC prefix and a 100-byte message); Turnout's server side
reads them and its client side sends them on; the upstream answers HEADERS, DATA and trailers
(grpc-status 0), which travel back the same way. Received DATA is acknowledged (flow control
by hand, as Turnout does it). Only the time spent in Turnout's two connections is counted: the
client's and the upstream's work is a different process in real life. Best of several rounds;
the ratio to h2 in the same run is the figure to quote.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable
from typing import Any

REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/shop.Cart/Add"),
    (b":authority", b"shop:8080"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"grpc-timeout", b"1S"),
    (b"user-agent", b"grpc-python/1.60"),
]
RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]
TRAILERS = [(b"grpc-status", b"0"), (b"grpc-message", b"")]
MESSAGE = b"\x00\x00\x00\x00\x64" + b"m" * 100


class H2Like:
    """h2's API, which jh2 (a fork) keeps: one connection of `module` in `role`."""

    def __init__(self, module: str, client: bool) -> None:
        connection = importlib.import_module(f"{module}.connection")
        config = importlib.import_module(f"{module}.config")
        self.events = importlib.import_module(f"{module}.events")
        self.conn = connection.H2Connection(
            config.H2Configuration(client_side=client, header_encoding=None)
        )
        self.conn.initiate_connection()

    def out(self) -> bytes:
        data: bytes = self.conn.data_to_send()
        return data

    def receive(self, data: bytes) -> list[tuple[str, int, Any]]:
        """(kind, stream id, payload) of what arrived: headers, data, trailers or end."""
        ev = self.events
        seen: list[tuple[str, int, Any]] = []
        for e in self.conn.receive_data(data):
            if isinstance(e, ev.RequestReceived | ev.ResponseReceived):
                seen.append(("headers", e.stream_id, e.headers))
            elif isinstance(e, ev.TrailersReceived):
                seen.append(("trailers", e.stream_id, e.headers))
            elif isinstance(e, ev.DataReceived):
                self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                seen.append(("data", e.stream_id, e.data))
        return seen

    def request(self, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
        stream_id: int = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, headers)
        self.conn.send_data(stream_id, body, end_stream=True)
        return stream_id

    def respond(self, stream_id: int, body: bytes) -> None:
        self.conn.send_headers(stream_id, RESPONSE)
        self.conn.send_data(stream_id, body)
        self.conn.send_headers(stream_id, TRAILERS, end_stream=True)


class Ngh2:
    """ngh2's own API (libnghttp2 underneath)."""

    def __init__(self, client: bool) -> None:
        ngh2 = importlib.import_module("ngh2")
        self.events = importlib.import_module("ngh2.events")
        role = ngh2.Role.CLIENT if client else ngh2.Role.SERVER
        self.conn = ngh2.Connection(role, ngh2.Configuration(auto_window_update=False))
        self.conn.initiate_connection()

    def out(self) -> bytes:
        data: bytes = self.conn.data_to_send()
        return data

    def receive(self, data: bytes) -> list[tuple[str, int, Any]]:
        ev = self.events
        seen: list[tuple[str, int, Any]] = []
        self.conn.receive_data(data)
        for e in self.conn.events():
            if isinstance(e, ev.RequestReceived | ev.ResponseReceived):
                seen.append(("headers", e.stream_id, e.headers))
            elif isinstance(e, ev.TrailersReceived):
                seen.append(("trailers", e.stream_id, e.headers))
            elif isinstance(e, ev.DataReceived):
                self.conn.acknowledge_received_data(len(e.data), e.stream_id)
                seen.append(("data", e.stream_id, e.data))
        return seen

    def request(self, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
        stream_id: int = self.conn.send_request(headers)
        self.conn.send_data(stream_id, body, end_stream=True)
        return stream_id

    def respond(self, stream_id: int, body: bytes) -> None:
        self.conn.send_response(stream_id, RESPONSE)
        self.conn.send_data(stream_id, body)
        self.conn.send_trailers(stream_id, TRAILERS)


CODECS: dict[str, Callable[[bool], Any]] = {
    "h2": lambda client: H2Like("h2", client),
    "jh2": lambda client: H2Like("jh2", client),
    "ngh2": Ngh2,
}


def round_of(make: Callable[[bool], Any], calls: int) -> float:
    """Seconds Turnout's two connections spent on `calls` proxied calls."""
    client, front, back, upstream = make(True), make(False), make(True), make(False)
    # Connection prefaces and SETTINGS both ways, before anything is timed.
    for _ in range(3):
        front.receive(client.out())
        client.receive(front.out())
        upstream.receive(back.out())
        back.receive(upstream.out())
    spent = 0.0
    clock = time.perf_counter
    for _ in range(calls):
        client.request(REQUEST, MESSAGE)
        wire = client.out()  # with its window updates for the last answer
        began = clock()
        body = b""
        for kind, sid, payload in front.receive(wire):
            if kind == "headers":
                headers, front_stream = payload, sid
            elif kind == "data":
                body += payload
        assert body == MESSAGE, "the request's message did not come through whole"
        back_stream = back.request(list(headers), body)
        to_upstream, to_client = back.out(), front.out()
        spent += clock() - began
        client.receive(to_client)
        for kind, sid, _payload in upstream.receive(to_upstream):
            if kind == "headers":
                upstream_stream = sid
        upstream.respond(upstream_stream, MESSAGE)
        wire = upstream.out()
        began = clock()
        answer = b""
        for kind, sid, payload in back.receive(wire):
            if sid == back_stream and kind == "data":
                answer += payload
        front.respond(front_stream, answer)
        to_client, to_upstream = front.out(), back.out()
        spent += clock() - began
        kinds = [kind for kind, _sid, _payload in client.receive(to_client)]
        assert answer == MESSAGE, kinds
        assert kinds == ["headers", "data", "trailers"], kinds
        upstream.receive(to_upstream)
    return spent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000, help="calls a round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    results: dict[str, float] = {}
    for name, make in CODECS.items():
        try:
            make(True)
        except ImportError:
            print(f"{name:>6}: not installed")
            continue
        best = min(round_of(make, args.calls) for _ in range(args.rounds))
        results[name] = best / args.calls * 1e6
    base = results.get("h2")
    for name, micros in results.items():
        ratio = f"  {micros / base:.2f}x h2" if base else ""
        print(f"{name:>6}: {micros:7.1f} µs of codec work a proxied call{ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
