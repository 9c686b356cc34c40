"""Python cost of one request on Turnout's data path, without sockets.

    python -m loadtests.hotpath                  # 20,000 requests a round, best of 7 rounds
    python -m loadtests.hotpath --in-flight 256  # 256 requests in flight, taken in turn
    TURNOUT_PURE=1 python -m loadtests.hotpath --profile   # where the time goes (cProfile)

Drives the real client and upstream protocols of a real proxy (every feature on: split,
balancer, breakers, admission, retry budget, metrics, analysis windows) through in-memory
transports: a GET with one header field in, an nginx-like 200 with eight fields and a 100-byte
body back. What is left is the interpreter's own work: no system calls and no event-loop
wakeups, so a change of a few percent shows here where wrk on a shared machine cannot see it.
The baseline, timed in the same run, is llhttp (httptools) parsing the same two messages with
empty callbacks, the floor under any proxy built on it. With --in-flight N, N client
connections each send a request before any answer comes back, as N busy connections do: the
work of one request is then spread between the others' (caches, the heap), as under load.
The benchmark (loadtests.bench) stays the judge; this says where the Python part of its
figures goes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from collections.abc import Callable
from typing import Any

import httptools
import uvloop
import yaml

from proxy import native
from proxy.config import parse_config
from proxy.http.server import ClientConnection
from proxy.http.upstream import UpstreamConnection
from proxy.runtime import Proxy, freeze_startup_heap

REQUEST = b"GET /b100 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 11:00:00 GMT\r\n"
    b"Content-Type: text/html\r\nContent-Length: 100\r\n"
    b"Last-Modified: Thu, 26 Nov 2026 10:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6565e3a0-64"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 100
)
CONFIG = """
listen: {host: 127.0.0.1, port: 0}
admin: {host: 127.0.0.1, port: 0}
pools:
  blue: {upstreams: [{url: "http://127.0.0.1:18081"}]}
  green: {upstreams: [{url: "http://127.0.0.1:18082"}]}
split: 10
"""


class Transport(asyncio.Transport):
    """Takes writes and counts them; never blocks, never closes by itself."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.last = b""
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        self.last = bytes(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def serving(proxy: Proxy, in_flight: int = 1) -> Callable[[], None]:
    """`in_flight` client connections and as many pooled upstream connections per pool;
    returns a function that runs one request on each (all sent, then all answered) and
    checks that each was answered."""
    for pool in ("blue", "green"):
        for upstream in proxy.router.pools[pool]:
            upstream.healthy = True
            for _ in range(in_flight):
                conn = UpstreamConnection(upstream)
                conn.connection_made(Transport())
                conn.reused = True
                upstream.idle.append(conn)
    proxy.router.refresh()
    clients: list[tuple[ClientConnection, Transport]] = []
    for _ in range(in_flight):
        client, to_client = ClientConnection(proxy), Transport()
        client.connection_made(to_client)
        clients.append((client, to_client))

    def one() -> None:
        for client, _ in clients:
            client.data_received(REQUEST)
        for client, _ in clients:
            ex = client.active
            if ex is None or ex.conn is None:
                raise SystemExit("hotpath: the request did not reach an upstream connection")
            ex.conn.data_received(RESPONSE)

    def checked() -> None:
        before = [to_client.writes for _, to_client in clients]
        one()
        for (_, to_client), writes in zip(clients, before, strict=True):
            answer = to_client.last
            if to_client.writes != writes + 1 or not answer.startswith(b"HTTP/1.1 200 OK"):
                raise SystemExit(f"hotpath: unexpected answer {answer[:60]!r}")

    for _ in range(100):
        checked()
    return one


class Empty:
    def on_header(self, name: bytes, value: bytes) -> None:
        pass

    def on_url(self, url: bytes) -> None:
        pass

    def on_headers_complete(self) -> None:
        pass

    def on_body(self, body: bytes) -> None:
        pass

    def on_message_complete(self) -> None:
        pass


def llhttp_alone() -> Callable[[], None]:
    request = httptools.HttpRequestParser(Empty())
    response = httptools.HttpResponseParser(Empty())

    def one() -> None:
        request.feed_data(REQUEST)
        response.feed_data(RESPONSE)

    return one


def best(step: Callable[[], None], requests: int, rounds: int) -> float:
    """Seconds per request of the fastest round (the one least disturbed by the machine)."""
    fastest = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(requests):
            step()
        fastest = min(fastest, (time.perf_counter() - started) / requests)
    return fastest


async def measure(args: argparse.Namespace) -> None:
    proxy = Proxy(parse_config(yaml.safe_load(CONFIG)))
    step = serving(proxy, args.in_flight)
    batches = max(1, args.requests // args.in_flight)
    baseline = llhttp_alone()
    freeze_startup_heap()  # as `turnout run` does after start
    print(native.describe())
    if args.profile:
        if native.BUILD == "compiled":
            print("the profiler cannot see into compiled modules: run with TURNOUT_PURE=1")
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(batches):
            step()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile_lines)
        return
    # Interleaved, like the benchmark's rounds: both see the same moments of the machine.
    turnout = llhttp = float("inf")
    for _ in range(args.rounds):
        turnout = min(turnout, best(step, batches, 1) / args.in_flight)
        llhttp = min(llhttp, best(baseline, args.requests, 1))
    in_flight = f", {args.in_flight} in flight" if args.in_flight > 1 else ""
    print(
        f"turnout data path   {turnout * 1e6:6.2f} µs a request (Python, no system calls"
        f"{in_flight})"
    )
    print(f"llhttp alone        {llhttp * 1e6:6.2f} µs a request (both messages parsed)")
    print(f"turnout / llhttp    {turnout / llhttp:6.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests a round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--in-flight", type=int, default=1, help="requests in flight at once (client connections)"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile one round instead")
    parser.add_argument("--profile-lines", type=int, default=30)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rounds < 1 or args.in_flight < 1:
        parser.error("--requests, --rounds and --in-flight must be at least 1")
    uvloop.run(measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
