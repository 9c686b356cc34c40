"""Hostile peers on the HTTP/1.1 data path: endless trailers and chunk extensions in both
directions, clients that pipeline without reading, headers that try to strip Host or repeat a
credential. Each attack runs over real sockets against the real proxy."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from conftest import HOST, ProxyFactory, proxy_config, wait_for
from helpers.raw_http import ClientFactory, RawClient, RawUpstreamFactory, Seen, read_response
from helpers.scripted import RawUpstream as ScriptedUpstream
from helpers.scripted import Script, parse_response

from proxy.http.server import ClientConnection
from proxy.runtime import Proxy

CHUNKED_POST = b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
NO_RETRIES = {"retries": {"attempts": 0}}


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], Awaitable[ScriptedUpstream]]]:
    """Upstreams that send exactly what a test's script writes (helpers.scripted.RawUpstream)."""
    made: list[ScriptedUpstream] = []

    async def make(script: Script) -> ScriptedUpstream:
        upstream = ScriptedUpstream(script)
        upstream.server = await asyncio.start_server(upstream.handle, HOST, 0)
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        assert upstream.server is not None
        upstream.server.close()
        for task in list(upstream.tasks):
            task.cancel()
        await asyncio.gather(*upstream.tasks, return_exceptions=True)
        await upstream.server.wait_closed()


async def flood(client: RawClient, piece: bytes, limit: int) -> tuple[bytes, int]:
    """Write `piece` over and over (up to `limit` bytes) until the proxy answers or hangs up;
    returns the answer's first bytes and how much was sent."""
    sent = 0
    reply = asyncio.ensure_future(client.reader.read(65536))
    try:
        while not reply.done() and sent < limit:
            client.writer.write(piece)
            sent += len(piece)
            try:
                await asyncio.wait_for(client.writer.drain(), 2.0)
            except (ConnectionError, TimeoutError):
                break
            await asyncio.sleep(0)
        return await asyncio.wait_for(reply, 3.0), sent
    finally:
        reply.cancel()


# --------------------------------------------------------------------------------------------
# Trailers and chunk extensions from a client.


@pytest.mark.parametrize(
    ("prefix", "piece"),
    [
        (b"5\r\nhello\r\n0\r\nX-Endless: ", b"v" * 16384),
        (b"5\r\nhello\r\n0\r\n", b"X-T: v\r\n" * 2048),
        (b"5;ext=", b"e" * 16384),
        (b"5\r\nhello\r\n3;name=", b"e" * 16384),
    ],
    ids=["endless trailer field", "endless trailer section", "first chunk", "later chunk"],
)
async def test_endless_trailers_or_chunk_extension_from_a_client_are_400(
    raw_upstream: RawUpstreamFactory,
    make_proxy: ProxyFactory,
    clients: ClientFactory,
    prefix: bytes,
    piece: bytes,
) -> None:
    upstream = await raw_upstream()
    proxy = await make_proxy(proxy_config([upstream.url], []))
    client = await clients(proxy.port)
    await client.send(CHUNKED_POST + prefix)
    started = asyncio.get_running_loop().time()
    data, sent = await flood(client, piece, 10_000_000)
    assert data.startswith(b"HTTP/1.1 400 "), data[:200]
    assert asyncio.get_running_loop().time() - started < 5.0
    # Refused within a few reads of the bound, not at the end of 10 MB.
    assert sent < 2_000_000
    assert upstream.requests == []


async def test_too_many_trailer_fields_from_a_client_are_400(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, clients: ClientFactory
) -> None:
    upstream = await raw_upstream()
    proxy = await make_proxy(proxy_config([upstream.url], []))
    client = await clients(proxy.port)
    trailers = b"".join(b"X-T%d: v\r\n" % i for i in range(101))
    await client.send(CHUNKED_POST + b"5\r\nhello\r\n0\r\n" + trailers + b"\r\n")
    resp = await client.response()
    assert resp.status == 400
    assert b"trailer" in resp.body
    assert upstream.requests == []


async def test_a_few_trailers_and_extensions_from_a_client_are_accepted(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, clients: ClientFactory
) -> None:
    upstream = await raw_upstream()
    proxy = await make_proxy(proxy_config([upstream.url], []))
    client = await clients(proxy.port)
    trailers = b"".join(b"X-T%d: %b\r\n" % (i, b"v" * 200) for i in range(100))
    body = b"5;a=" + b"x" * 1000 + b"\r\nhello\r\n0\r\n" + trailers + b"\r\n"
    resp = await client.request(CHUNKED_POST + body)
    assert resp.status == 200
    [seen] = upstream.requests
    assert seen.body == b"hello"
    assert b"x-t0" not in seen.names()  # trailers are not forwarded


# --------------------------------------------------------------------------------------------
# Trailers and chunk extensions from an upstream.


def endless(start: bytes, piece: bytes, sent: list[int]) -> Script:
    """An upstream that answers with `start`, then writes `piece` until the proxy hangs up."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        # A small send buffer: what was sent is close to what the proxy read.
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        writer.write(start)
        while sent[0] < 50_000_000:
            writer.write(piece)
            sent[0] += len(piece)
            await writer.drain()

    return script


CHUNKED_200 = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("start", "piece"),
    [
        (CHUNKED_200 + b"5\r\nhello\r\n0\r\nX-Endless: ", b"v" * 16384),
        (CHUNKED_200 + b"5\r\nhello\r\n0\r\n", b"X-T: v\r\n" * 2048),
        (CHUNKED_200 + b"5\r\nhello\r\n3;name=", b"e" * 16384),
    ],
    ids=["endless trailer field", "endless trailer section", "chunk extension"],
)
async def test_endless_trailers_or_chunk_extension_from_an_upstream_cut_the_response(
    scripted: Callable[[Script], Awaitable[ScriptedUpstream]],
    make_proxy: ProxyFactory,
    start: bytes,
    piece: bytes,
) -> None:
    sent = [0]
    upstream = await scripted(endless(start, piece, sent))
    proxy = await make_proxy(proxy_config([upstream.url], [], **NO_RETRIES))
    reader, writer = await asyncio.open_connection(HOST, proxy.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        async with asyncio.timeout(5):
            data = await reader.read(-1)
    finally:
        writer.close()
    # The head and the first chunk had left already: the client sees the body cut short.
    parsed = parse_response(data)
    assert parsed.status == 200
    assert not parsed.complete, data[:300]
    assert parsed.body == b"hello"
    assert sent[0] < 2_000_000
    await wait_for(lambda: not upstream.tasks)  # the proxy closed the upstream connection


# --------------------------------------------------------------------------------------------
# Pipelining without reading.


def numbered(seen: Seen) -> bytes:
    """A 4 KiB answer naming the request it answers."""
    body = seen.target + b" " + b"x" * (4096 - len(seen.target) - 1)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


def connection_of(proxy: Proxy) -> ClientConnection:
    [conn] = [c for c in proxy.connections if isinstance(c, ClientConnection)]
    return conn


async def test_pipelining_client_that_does_not_read_holds_one_parsed_request(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory
) -> None:
    upstream = await raw_upstream(numbered)
    proxy = await make_proxy(proxy_config([upstream.url], []))
    count = 10_000
    requests = b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(count))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (HOST, proxy.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            for conn in proxy.connections:
                if isinstance(conn, ClientConnection):
                    most = max(most, len(conn.pipeline))
            await asyncio.sleep(0.002)

    watcher = asyncio.ensure_future(watch())
    try:
        writer.write(requests)  # all of it, without reading a byte
        await wait_for(lambda: bool(proxy.connections), 5.0)
        conn = connection_of(proxy)
        # The client does not read: the proxy's writes back up and its upstream reads stop.
        await wait_for(lambda: conn.write_paused, 20.0)
        assert len(conn.pipeline) <= 1, conn
        assert "held=" in repr(conn)
        assert conn.held is None or len(conn.held) - conn.held_at <= 262144
        # Then it reads: every answer arrives, in order.
        async with asyncio.timeout(60):
            for i in range(count):
                resp = await read_response(reader)
                assert resp.status == 200
                assert resp.body.startswith(b"/%d " % i), (i, resp.body[:20])
    finally:
        watcher.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert most <= 1
    assert len(upstream.requests) == count


def echo_target(seen: Seen) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(seen.target), seen.target)


async def test_pipelined_bodies_that_look_like_requests_are_parsed_as_bodies(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory
) -> None:
    # Blank lines, last-chunk look-alikes and request heads inside bodies, line breaks split
    # across writes: every request is parsed once, whole, in order; then the client half-closes.
    fake = b"\r\n\r\nGET /fake HTTP/1.1\r\nHost: a\r\n\r\n0\r\n\r\n"
    chunked = b"%x\r\n%b\r\n" % (len(fake), fake) + b"0\r\nX-T: 1\r\n\r\n"
    stream = (
        b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%b" % (len(fake), fake)
        + b"POST /2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked
        + b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(3, 500))
        + b"POST /500 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    upstream = await raw_upstream(echo_target)
    proxy = await make_proxy(proxy_config([upstream.url], []))
    reader, writer = await asyncio.open_connection(HOST, proxy.port)
    try:
        for size in (1, 2, 3, 7, 4096):
            # The same requests cut at different places.
            for i in range(0, len(stream), size * 97):
                writer.write(stream[i : i + size * 97])
                await writer.drain()
            async with asyncio.timeout(20):
                for i in range(1, 501):
                    resp = await read_response(reader)
                    assert resp.body == b"/%d" % i, (size, i, resp.body)
        writer.write_eof()
        async with asyncio.timeout(5):
            assert await reader.read() == b""
    finally:
        writer.close()
    assert len(upstream.requests) == 2500
    assert upstream.requests[0].body == fake
    assert upstream.requests[1].body == fake


# --------------------------------------------------------------------------------------------
# Headers that Connection must not strip; singletons that must not repeat.


async def test_connection_naming_host_or_framing_headers_strips_neither(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, clients: ClientFactory
) -> None:
    def answer(seen: Seen) -> bytes:
        return (
            b"HTTP/1.1 200 OK\r\nConnection: content-length, transfer-encoding, x-gone\r\n"
            b"X-Gone: 1\r\nContent-Length: 2\r\n\r\nok"
        )

    upstream = await raw_upstream(answer)
    proxy = await make_proxy(proxy_config([upstream.url], []))
    client = await clients(proxy.port)
    resp = await client.request(
        b"POST /p HTTP/1.1\r\nHost: app.example\r\nContent-Length: 3\r\n"
        b"Connection: keep-alive, Host, content-length, X-Drop\r\nX-Drop: 1\r\n\r\nabc"
    )
    [seen] = upstream.requests
    assert seen.values(b"host") == [b"app.example"]
    assert seen.values(b"content-length") == [b"3"]
    assert seen.body == b"abc"
    assert b"x-drop" not in seen.names()
    assert resp.status == 200
    assert resp.body == b"ok"
    assert resp.value(b"content-length") == b"2"
    assert b"x-gone" not in resp.names()
    # The connection is still in step: a second request on it is answered.
    assert (await client.request(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200
