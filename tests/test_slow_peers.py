"""Slow and stalled peers: every phase of an exchange has an inactivity bound that ends it and
gives back its upstream slot; WebSocket tunnels apply backpressure both ways and pass a
half-close on. Small limits (0.3 s) against real sockets; the bounds asserted are generous
("within 5 s"): they show that a slot comes back, not how fast."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import h2.events
import pytest
from conftest import HOST, ProxyFactory, SampleFactory, proxy_config, wait_for
from helpers.http2 import RawH2, h2_pools, up
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

from proxy.config import ConfigError, parse_config
from proxy.http.server import ClientConnection
from proxy.procs.shared import OutcomeReport, routing_state
from proxy.procs.supervisor import WorkerPool, supervisor_proxy
from proxy.procs.worker import Member
from proxy.runtime import Proxy

MiB = 1024 * 1024
BOUND = 5.0  # a slot held this long after its phase's timeout would be held forever
SMALL = "0.3s"

HEALTHY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)

Handler = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def upgrade_request(path: bytes = b"/ws") -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET %b HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %b\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path, key)
    )


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Hand-written upstreams: health probes are answered, every other request head is
    handed to the test's handler with the connection."""
    servers: list[asyncio.Server] = []
    tasks: set[asyncio.Task[Any]] = set()

    async def make(handler: Handler) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /healthz "):
                    writer.write(HEALTHY)
                    return
                await handler(head, reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                tasks.discard(task)

        server = await asyncio.start_server(serve, HOST, 0)
        servers.append(server)
        return f"http://{HOST}:{server.sockets[0].getsockname()[1]}"

    yield make
    for server in servers:
        server.close()
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for server in servers:
        await server.wait_closed()


def in_flight(proxy: Proxy) -> int:
    return sum(u.in_flight for u in proxy.router.upstreams())


def blue(proxy: Proxy) -> Any:
    return proxy.router.pools["blue"][0]


def metric(proxy: Proxy, phase: str) -> float:
    text = proxy.metrics.exposition()[0].decode()
    line = f'turnout_timeouts_total{{phase="{phase}"}} '
    for row in text.splitlines():
        if row.startswith(line):
            return float(row[len(line) :])
    raise AssertionError(f"no {line!r} in the metrics")


async def logged(path: Path, method: str) -> dict[str, Any]:
    """The access log's line for the request with `method` (the log is written by a thread)."""

    def lines() -> list[dict[str, Any]]:
        text = path.read_text() if path.exists() else ""
        return [e for e in map(json.loads, text.splitlines()) if e["method"] == method]

    await wait_for(lambda: bool(lines()))
    return lines()[0]


async def read_all(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(BOUND):
        return await reader.read(-1)


async def get_ok(session: aiohttp.ClientSession, proxy: Proxy) -> None:
    async with session.get(f"http://{HOST}:{proxy.port}/headers") as resp:
        assert resp.status == 200


# -- settings ------------------------------------------------------------------------------------


def test_inactivity_bounds_have_defaults_and_refuse_nonsense() -> None:
    t = parse_config(proxy_config([], [])).timeouts
    assert (t.client_body, t.client_send, t.upstream_body, t.tunnel_idle) == (30, 30, 30, 300)
    # The keys DESIGN.md names keep their meaning and defaults.
    assert (t.connect, t.response_headers, t.idle) == (2.0, 30.0, 60.0)
    with pytest.raises(ConfigError) as info:
        parse_config(proxy_config([], [], timeouts={"client_body": "0s", "tunnel_idle": "soon"}))
    assert "timeouts.client_body" in str(info.value)
    assert "timeouts.tunnel_idle" in str(info.value)


# -- slow POST ---------------------------------------------------------------------------------


async def test_stalled_request_body_is_408_and_frees_the_slot(
    sample: SampleFactory,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A POST head and one body byte, then nothing: with max_in_flight 1 every other client
    would get 503 for as long as the client likes, were the body phase not bounded."""
    upstream = await sample("blue")
    proxy = await make_proxy(
        proxy_config(
            [upstream.url],
            [upstream.url],
            limits={"max_in_flight": 1, "queue": 0},
            timeouts={"client_body": SMALL},
            access_log={"to": str(tmp_path / "access.log")},
        )
    )
    reader, writer = await asyncio.open_connection(HOST, proxy.port)
    try:
        writer.write(b"POST /sink HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\nx")
        await wait_for(lambda: in_flight(proxy) == 1)
        answer = await read_all(reader)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"Connection: close" in answer
    assert b"no request body byte within 0.3s" in answer
    await wait_for(lambda: in_flight(proxy) == 0, BOUND)
    await get_ok(session, proxy)
    assert metric(proxy, "client_body") == 1
    # The client's slowness is not the upstream's failure.
    assert blue(proxy).failures == 0
    assert blue(proxy).breaker.snapshot().state.value == "closed"
    entry = await logged(tmp_path / "access.log", "POST")
    assert (entry["status"], entry["reason"]) == (408, "client_body_timeout")


async def test_request_body_that_keeps_coming_is_not_cut(
    sample: SampleFactory, make_proxy: ProxyFactory
) -> None:
    """The bound is on inactivity, not on the whole body: a body sent in pieces, each far
    within client_body of the last, arrives whole though it takes longer than client_body."""
    upstream = await sample("blue")
    proxy = await make_proxy(
        proxy_config([upstream.url], [upstream.url], timeouts={"client_body": "2s"})
    )
    reader, writer = await asyncio.open_connection(HOST, proxy.port)
    try:
        writer.write(b"POST /sink HTTP/1.1\r\nHost: test\r\nContent-Length: 40\r\n\r\n")
        for _ in range(8):
            await asyncio.sleep(0.5)  # pacing the sender, 4 x under the bound: 4 s in all
            writer.write(b"x" * 5)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert metric(proxy, "client_body") == 0


# -- slow read ---------------------------------------------------------------------------------


async def test_client_that_never_reads_is_cut_and_frees_the_slot(
    sample: SampleFactory, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    upstream = await sample("blue")
    proxy = await make_proxy(
        proxy_config(
            [upstream.url],
            [upstream.url],
            limits={"max_in_flight": 1, "queue": 0},
            timeouts={"client_send": SMALL},
        )
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (HOST, proxy.port))
    try:
        await loop.sock_sendall(sock, b"GET /bytes/268435456 HTTP/1.1\r\nHost: test\r\n\r\n")
        await wait_for(lambda: in_flight(proxy) == 1)
        # Never reading: the proxy's buffer towards the client fills and stays full.
        await wait_for(lambda: in_flight(proxy) == 0, BOUND)
        await get_ok(session, proxy)
        assert metric(proxy, "client_send") == 1
        assert blue(proxy).failures == 0
        # The connection was cut: what the client reads ends short of 256 MiB.
        sock.setblocking(True)
        sock.settimeout(BOUND)
        total = 0
        while chunk := await asyncio.to_thread(_recv, sock):
            total += len(chunk)
        assert total < 256 * MiB
    finally:
        sock.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(MiB)
    except ConnectionResetError:
        return b""


# -- stalled upstream --------------------------------------------------------------------------


async def test_upstream_stalled_mid_body_is_cut_counted_and_frees_the_slot(
    raw_upstream: Callable[[Handler], Awaitable[str]],
    make_proxy: ProxyFactory,
) -> None:
    async def stall(
        head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"y" * 10)
        await writer.drain()
        await reader.read(-1)  # then nothing, until the proxy hangs up

    url = await raw_upstream(stall)
    proxy = await make_proxy(
        proxy_config([url], [url], limits={"max_in_flight": 1}, timeouts={"upstream_body": SMALL})
    )
    reader, writer = await asyncio.open_connection(HOST, proxy.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        answer = await read_all(reader)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer
    assert body == b"y" * 10  # cut short, never made to look complete
    await wait_for(lambda: in_flight(proxy) == 0, BOUND)
    assert metric(proxy, "upstream_body") == 1
    # The upstream's stall is its failure.
    assert blue(proxy).failures == 1
    assert blue(proxy).breaker.snapshot().consecutive_failures == 1


async def test_upstream_that_takes_no_request_body_is_504(
    raw_upstream: Callable[[Handler], Awaitable[str]],
    make_proxy: ProxyFactory,
) -> None:
    stop = asyncio.Event()

    async def deaf(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stop.wait()  # reads nothing of the body

    url = await raw_upstream(deaf)
    proxy = await make_proxy(
        proxy_config([url], [url], timeouts={"upstream_body": SMALL, "response_headers": "60s"})
    )
    size = 64 * MiB
    reader, writer = await asyncio.open_connection(HOST, proxy.port)
    try:
        writer.write(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % size)

        async def push() -> None:
            chunk = b"z" * MiB
            for _ in range(size // MiB):
                writer.write(chunk)
                await writer.drain()

        pusher = asyncio.create_task(push())
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
        finally:
            pusher.cancel()
            await asyncio.gather(pusher, return_exceptions=True)
    finally:
        writer.close()
        stop.set()
    assert head.startswith(b"HTTP/1.1 504 "), head
    await wait_for(lambda: in_flight(proxy) == 0, BOUND)
    assert metric(proxy, "upstream_body") == 1
    assert blue(proxy).failures == 1


# -- tunnels -----------------------------------------------------------------------------------


async def test_idle_websocket_tunnel_is_closed_and_frees_the_slot(
    sample: SampleFactory, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    upstream = await sample("blue")
    proxy = await make_proxy(
        proxy_config([upstream.url], [upstream.url], timeouts={"tunnel_idle": SMALL})
    )
    async with asyncio.timeout(BOUND + 5):
        async with session.ws_connect(
            f"http://{HOST}:{proxy.port}/ws", autoping=False, heartbeat=None
        ) as ws:
            await ws.send_str("still here")
            assert await ws.receive_str() == "still here"
            assert in_flight(proxy) == 1
            msg = await ws.receive(timeout=BOUND)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
    await wait_for(lambda: in_flight(proxy) == 0, BOUND)
    await wait_for(lambda: not proxy.tunnels)
    assert metric(proxy, "tunnel_idle") == 1


async def test_tunnel_pauses_a_client_whose_upstream_reads_nothing(
    raw_upstream: Callable[[Handler], Awaitable[str]],
    make_proxy: ProxyFactory,
) -> None:
    """Client to upstream: what the proxy holds for an upstream that reads nothing stays
    bounded however much the client pushes; the client is paused instead."""
    stop = asyncio.Event()

    async def deaf(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SWITCHING)
        await writer.drain()
        await stop.wait()

    url = await raw_upstream(deaf)
    proxy = await make_proxy(proxy_config([url], [url]))
    reader, writer = await asyncio.open_connection(HOST, proxy.port)
    pushed = 0

    async def push() -> None:
        nonlocal pushed
        chunk = b"w" * (256 * 1024)
        while pushed < 50 * MiB:
            writer.write(chunk)
            await writer.drain()
            pushed += len(chunk)

    pusher: asyncio.Task[None] | None = None
    try:
        writer.write(upgrade_request())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
        assert head.startswith(b"HTTP/1.1 101 "), head
        pusher = asyncio.create_task(push())

        def paused() -> ClientConnection | None:
            for conn in proxy.tunnels:
                if conn.paused & conn.PAUSE_UPSTREAM:
                    return conn
            return None

        await wait_for(lambda: paused() is not None, 10.0)
        conn = paused()
        assert conn is not None
        assert conn.tunnel is not None
        assert conn.tunnel.write_buffer_size() < 4 * MiB
        assert not pusher.done()
        assert pushed < 50 * MiB
    finally:
        if pusher is not None:
            pusher.cancel()
            await asyncio.gather(pusher, return_exceptions=True)
        writer.close()
        stop.set()


async def test_client_half_close_reaches_the_upstream_and_its_answer_the_client(
    raw_upstream: Callable[[Handler], Awaitable[str]],
    make_proxy: ProxyFactory,
) -> None:
    async def counter(
        head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(SWITCHING)
        await writer.drain()
        received = await reader.read(-1)  # up to the client's half-close
        writer.write(b"got %d bytes" % len(received))
        await writer.drain()

    url = await raw_upstream(counter)
    proxy = await make_proxy(proxy_config([url], [url]))
    reader, writer = await asyncio.open_connection(HOST, proxy.port)
    try:
        writer.write(upgrade_request())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
        assert head.startswith(b"HTTP/1.1 101 "), head
        writer.write(b"q" * 100_000)
        writer.write_eof()
        assert await read_all(reader) == b"got 100000 bytes"
    finally:
        writer.close()
    await wait_for(lambda: in_flight(proxy) == 0, BOUND)
    await wait_for(lambda: not proxy.connections, BOUND)


async def test_half_close_before_the_upgrade_is_confirmed_is_passed_on_after_it(
    raw_upstream: Callable[[Handler], Awaitable[str]],
    make_proxy: ProxyFactory,
) -> None:
    """The client sends its handshake, a first message and its FIN at once; the upstream
    switches protocols only after the proxy has seen that FIN, and still gets both."""
    proxies: list[Proxy] = []

    async def late(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await wait_for(lambda: any(c.tunnel_eof for c in proxies[0].connections), BOUND)
        writer.write(SWITCHING)
        await writer.drain()
        received = await reader.read(-1)
        writer.write(b"got %b" % received)
        await writer.drain()

    url = await raw_upstream(late)
    proxies.append(await make_proxy(proxy_config([url], [url])))
    reader, writer = await asyncio.open_connection(HOST, proxies[0].port)
    try:
        writer.write(upgrade_request() + b"early")
        writer.write_eof()
        answer = await read_all(reader)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 101 "), answer
    assert answer.endswith(b"\r\n\r\ngot early"), answer
    await wait_for(lambda: in_flight(proxies[0]) == 0, BOUND)


async def test_upstream_half_close_reaches_the_client_which_may_still_send(
    raw_upstream: Callable[[Handler], Awaitable[str]],
    make_proxy: ProxyFactory,
) -> None:
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def closer(
        head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(SWITCHING + b"bye")
        writer.write_eof()
        got.set_result(await reader.read(-1))

    url = await raw_upstream(closer)
    proxy = await make_proxy(proxy_config([url], [url]))
    reader, writer = await asyncio.open_connection(HOST, proxy.port)
    try:
        writer.write(upgrade_request())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert await read_all(reader) == b"bye"  # the upstream's half-close
        writer.write(b"last words")
        writer.write_eof()
        assert await asyncio.wait_for(got, BOUND) == b"last words"
    finally:
        writer.close()
    await wait_for(lambda: not proxy.connections, BOUND)
    await wait_for(lambda: in_flight(proxy) == 0, BOUND)


# -- workers ------------------------------------------------------------------------------------


async def test_timeouts_in_workers_add_up_on_the_leader() -> None:
    """With --workers the leader's /metrics counts the timeouts of every worker."""
    config = parse_config(proxy_config(["http://127.0.0.1:9001"], ["http://127.0.0.1:9002"]))
    leader = supervisor_proxy(config, workers=2)
    pool = leader.front
    assert isinstance(pool, WorkerPool)
    members = [Member(config, member=f"worker-{i}", workers=2) for i in range(2)]
    state = routing_state(leader, 1, 1, 0.0)
    for i, member in enumerate(members):
        member.follow(state)
        member.proxy.observed.timeouts["client_body"] += 1 + i
        member.proxy.observed.timeouts["tunnel_idle"] += 1
    for member in members:
        report = member.report()
        assert report is not None
        pool.merge(OutcomeReport.from_wire(json.loads(json.dumps(report.to_wire()))))
        assert member.report() is None  # nothing new since
    assert metric(leader, "client_body") == 3
    assert metric(leader, "tunnel_idle") == 2
    assert metric(leader, "client_send") == 0


# -- HTTP/2 -------------------------------------------------------------------------------------


async def test_http2_stream_whose_client_opens_no_window_is_reset_and_frees_the_slot(
    sample: SampleFactory, make_proxy: ProxyFactory
) -> None:
    """Each HTTP/2 stream is bounded like an HTTP/1.1 exchange: a stream whose client never
    opens its flow-control window is reset after client_send, the other streams unaffected."""
    upstream = await sample("blue")
    proxy = await make_proxy(
        proxy_config([upstream.url], [upstream.url], timeouts={"client_send": SMALL})
    )
    client = await RawH2.open(proxy.port)
    try:
        stuck = client.request("/bytes/20000000")
        await client.until(lambda: bool(client.of(h2.events.StreamReset)), timeout=BOUND)
        (reset,) = client.of(h2.events.StreamReset)
        assert reset.stream_id == stuck
        assert not client.of(h2.events.StreamEnded)  # cut, never made to look complete
        # The connection's window went to the stuck stream: give it back, then ask again.
        client.conn.increment_flow_control_window(1 << 24)
        other = client.request("/headers")
        await client.until(lambda: bool(client.of(h2.events.StreamEnded)), timeout=BOUND)
        (ended,) = client.of(h2.events.StreamEnded)
        assert ended.stream_id == other
    finally:
        client.close()
    await wait_for(lambda: in_flight(proxy) == 0, BOUND)
    assert metric(proxy, "client_send") == 1


async def test_http2_upstream_stalled_mid_body_is_cut_counted_and_frees_the_slot(
    make_proxy: ProxyFactory,
) -> None:
    """An HTTP/2 upstream's stream is bounded like an HTTP/1.1 upstream connection."""
    stop = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/healthz":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        headers = [(b"content-length", b"1000")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"y" * 10, "more_body": True})
        await stop.wait()  # then nothing

    sock = socket.socket()
    sock.bind((HOST, 0))
    url = f"http://{HOST}:{sock.getsockname()[1]}"
    config = HypercornConfig()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = config.errorlog = None
    server = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    try:
        proxy = await make_proxy(h2_pools(url, url, timeouts={"upstream_body": SMALL}))
        await up(proxy)
        reader, writer = await asyncio.open_connection(HOST, proxy.port)
        try:
            writer.write(b"GET /stall HTTP/1.1\r\nHost: test\r\n\r\n")
            answer = await read_all(reader)
        finally:
            writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), answer
        assert body == b"y" * 10
        await wait_for(lambda: in_flight(proxy) == 0, BOUND)
        assert metric(proxy, "upstream_body") == 1
        assert blue(proxy).failures == 1
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)
