"""Malformed and abusive requests are refused by the proxy and never reach an upstream.

Every refusal is checked the same way: the client gets the status and a closed connection,
then a valid sentinel request on a fresh connection reaches the raw upstream, which must have
seen that one request and nothing else.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from conftest import ProxyFactory, proxy_config, wait_for
from helpers.raw_http import (
    ClientFactory,
    RawClient,
    RawUpstream,
    RawUpstreamFactory,
    read_response,
)

HEADER_TIMEOUT = 0.5
HEAD = b"POST /bad HTTP/1.1\r\nHost: a\r\n"
CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"

BAD_REQUESTS: dict[str, bytes] = {
    "missing host": b"GET / HTTP/1.1\r\n\r\n",
    "duplicate host": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "duplicate host, same value": b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
    "duplicate Authorization": b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Basic YTpi\r\n"
    b"authorization: Basic Yzpk\r\n\r\n",
    "duplicate Authorization, same value": b"GET / HTTP/1.1\r\nHost: a\r\n"
    b"Authorization: Bearer t\r\nX-A: b\r\nAuthorization: Bearer t\r\n\r\n",
    "duplicate Proxy-Authorization": b"GET / HTTP/1.1\r\nHost: a\r\n"
    b"Proxy-Authorization: Basic YTpi\r\nProxy-Authorization: Basic Yzpk\r\n\r\n",
    "duplicate Content-Type": HEAD + b"Content-Type: text/plain\r\n"
    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    "space before colon": b"GET / HTTP/1.1\r\nHost: a\r\nX-Foo : bar\r\n\r\n",
    "space before colon of Host": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "obs-fold with space": b"GET / HTTP/1.1\r\nHost: a\r\nX-Foo: a\r\n b\r\n\r\n",
    "obs-fold with tab": b"GET / HTTP/1.1\r\nHost: a\r\nX-Foo: a\r\n\tb\r\n\r\n",
    "NUL in value": b"GET / HTTP/1.1\r\nHost: a\r\nX-Foo: a\x00b\r\n\r\n",
    "bare CR in value": b"GET / HTTP/1.1\r\nHost: a\r\nX-Foo: a\rb\r\n\r\n",
    "bare CR ending a header": b"GET / HTTP/1.1\r\nHost: a\rX-Foo: b\r\n\r\n",
    "control char in name": b"GET / HTTP/1.1\r\nHost: a\r\nX\x01Foo: b\r\n\r\n",
    "empty header name": b"GET / HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n",
    "Content-Length letters": HEAD + b"Content-Length: abc\r\n\r\nhello",
    "Content-Length negative": HEAD + b"Content-Length: -5\r\n\r\nhello",
    "Content-Length plus sign": HEAD + b"Content-Length: +5\r\n\r\nhello",
    "Content-Length hex": HEAD + b"Content-Length: 0x5\r\n\r\nhello",
    "Content-Length two numbers": HEAD + b"Content-Length: 5 5\r\n\r\nhello",
    "Content-Length list": HEAD + b"Content-Length: 5, 6\r\n\r\nhello",
    "Content-Length empty": HEAD + b"Content-Length: \r\n\r\nhello",
    "Content-Length overflow": HEAD + b"Content-Length: 99999999999999999999999\r\n\r\nhello",
    "two differing Content-Length": HEAD + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "Content-Length and Transfer-Encoding": HEAD
    + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "Transfer-Encoding and Content-Length": HEAD
    + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    "TE xchunked": HEAD + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "TE chunked, identity": HEAD + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "TE identity, chunked": HEAD + b"Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
    "TE gzip, chunked": HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "TE chunked with parameter": HEAD + b"Transfer-Encoding: chunked;q=1\r\n\r\n0\r\n\r\n",
    "TE space before colon": HEAD + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "TE line starting with space": b"POST /bad HTTP/1.1\r\n Transfer-Encoding: chunked\r\n"
    b"Host: a\r\n\r\n0\r\n\r\n",
    "TE folded onto the previous header": HEAD
    + b"X-Foo: a\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE after vertical tab": HEAD + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
    "TE empty": HEAD + b"Transfer-Encoding: \r\n\r\n",
    "two TE headers": HEAD
    + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two TE headers gzip then chunked": HEAD
    + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE in an HTTP/1.0 request": b"POST /bad HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    "chunk size not hex": CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n",
    "chunk size negative": CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n",
    "chunk size 0x prefix": CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n",
    "chunk size overflow": CHUNKED + b"fffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "chunk size leading space": CHUNKED + b" 5\r\nhello\r\n0\r\n\r\n",
    "chunk size trailing space": CHUNKED + b"5 \r\nhello\r\n0\r\n\r\n",
    "chunk size empty": CHUNKED + b"\r\nhello\r\n0\r\n\r\n",
    "chunk size bare LF": CHUNKED + b"5\nhello\r\n0\r\n\r\n",
    "chunk longer than its size": CHUNKED + b"5\r\nhelloX\r\n0\r\n\r\n",
    "lower-case method": b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
    "space in target": b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
    "control char in target": b"GET /a\x01b HTTP/1.1\r\nHost: a\r\n\r\n",
    "bad version": b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
}

# Valid spellings next to the refused ones: the proxy must not refuse these.
GOOD_CHUNKED: dict[str, bytes] = {
    "TE after tab": HEAD + b"Transfer-Encoding:\tchunked\r\n\r\n",
    "TE upper case": HEAD + b"Transfer-Encoding: CHUNKED\r\n\r\n",
    "TE trailing spaces": HEAD + b"Transfer-Encoding:   chunked   \r\n\r\n",
    "TE plain": HEAD + b"Transfer-Encoding: chunked\r\n\r\n",
}


@pytest.fixture
async def front(raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory) -> Any:
    upstream = await raw_upstream()
    proxy = await make_proxy(
        proxy_config([upstream.url], [], timeouts={"request_headers": f"{HEADER_TIMEOUT}s"})
    )
    return upstream, proxy


async def assert_only_sentinel_forwarded(
    upstream: RawUpstream, port: int, clients: ClientFactory
) -> None:
    """A fresh request goes through; before it, nothing reached the upstream."""
    client = await clients(port)
    resp = await client.request(b"GET /sentinel HTTP/1.1\r\nHost: a\r\n\r\n")
    assert resp.status == 200
    assert upstream.targets == [b"/sentinel"]
    assert upstream.connections == 1


async def refused(client: RawClient, status: int) -> dict[str, Any]:
    """Read the proxy's refusal: the status, a JSON body, Connection: close, then EOF."""
    resp = await client.response()
    assert resp.status == status, resp
    assert resp.value(b"connection") == b"close"
    body: dict[str, Any] = json.loads(resp.body)
    assert body["error"]
    assert body["detail"]
    assert await client.closed() == b""
    return body


@pytest.mark.parametrize("request_bytes", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
async def test_malformed_request_refused_with_400_and_never_forwarded(
    front: Any, clients: ClientFactory, request_bytes: bytes
) -> None:
    upstream, proxy = front
    client = await clients(proxy.port)
    await client.send(request_bytes)
    await refused(client, 400)
    await assert_only_sentinel_forwarded(upstream, proxy.port, clients)


@pytest.mark.parametrize("head", GOOD_CHUNKED.values(), ids=GOOD_CHUNKED.keys())
async def test_valid_chunked_spellings_are_forwarded(
    front: Any, clients: ClientFactory, head: bytes
) -> None:
    upstream, proxy = front
    client = await clients(proxy.port)
    resp = await client.request(head + b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert resp.status == 200
    [seen] = upstream.requests
    assert seen.body == b"hello world"
    assert [v.strip().lower() for v in seen.values(b"transfer-encoding")] in ([b"chunked"], [])
    assert seen.values(b"content-length") in ([], [b"11"])


async def test_invalid_chunk_after_forwarding_began_never_completes_upstream(
    front: Any, clients: ClientFactory
) -> None:
    upstream, proxy = front
    client = await clients(proxy.port)
    await client.send(CHUNKED + b"5\r\nhello\r\n")

    await wait_for(lambda: upstream.received > 0)
    await client.send(b"zz\r\nmore\r\n0\r\n\r\n")
    resp = await client.response()
    assert resp.status == 400
    assert await client.closed() == b""

    # The upstream saw a cut request and its connection end, never a complete request.
    await wait_for(lambda: upstream.closed == 1)
    assert upstream.requests == []


async def test_http2_version_refused_with_505(front: Any, clients: ClientFactory) -> None:
    upstream, proxy = front
    client = await clients(proxy.port)
    await client.send(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n")
    await refused(client, 505)
    await assert_only_sentinel_forwarded(upstream, proxy.port, clients)


# --------------------------------------------------------------------------------------------
# Limits: request target and head size.


async def test_oversized_request_target_is_414(front: Any, clients: ClientFactory) -> None:
    upstream, proxy = front
    client = await clients(proxy.port)
    await client.send(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    await refused(client, 414)
    await assert_only_sentinel_forwarded(upstream, proxy.port, clients)


async def test_long_but_allowed_request_target_is_forwarded(
    front: Any, clients: ClientFactory
) -> None:
    upstream, proxy = front
    target = b"/" + b"a" * 7000 + b"?" + b"q" * 1000
    client = await clients(proxy.port)
    assert (await client.request(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")).status == 200
    assert upstream.targets == [target]


@pytest.mark.parametrize(
    "headers",
    [
        b"X-Big: " + b"v" * 40_000 + b"\r\n",
        b"".join(b"X-H%d: v\r\n" % i for i in range(101)),
        b"".join(b"X-H%d: %b\r\n" % (i, b"v" * 400) for i in range(90)),
    ],
    ids=["one huge header", "101 headers", "90 headers of 400 bytes"],
)
async def test_oversized_head_is_431(front: Any, clients: ClientFactory, headers: bytes) -> None:
    upstream, proxy = front
    client = await clients(proxy.port)
    await client.send(b"GET / HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n")
    await refused(client, 431)
    await assert_only_sentinel_forwarded(upstream, proxy.port, clients)


async def test_large_but_allowed_head_is_forwarded(front: Any, clients: ClientFactory) -> None:
    upstream, proxy = front
    headers = b"".join(b"X-H%d: %b\r\n" % (i, b"v" * 200) for i in range(90))
    client = await clients(proxy.port)
    resp = await client.request(b"GET /big HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n")
    assert resp.status == 200
    [seen] = upstream.requests
    assert len(seen.headers) >= 90


async def test_head_limits_are_settings(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, clients: ClientFactory
) -> None:
    """listen.max_request_target, max_header_bytes and max_header_fields move the limits both
    ways: what the defaults refuse passes, and what they pass is refused."""
    upstream = await raw_upstream()
    roomy = await make_proxy(
        proxy_config(
            [upstream.url],
            [],
            listen={
                "host": "127.0.0.1",
                "port": 0,
                "max_request_target": 20000,
                "max_header_bytes": 100_000,
                "max_header_fields": 300,
            },
        )
    )
    target = b"/" + b"a" * 15000
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(250))
    huge = b"X-Big: " + b"v" * 60_000 + b"\r\n"
    for head in (
        b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n" + huge + b"\r\n",
    ):
        client = await clients(roomy.port)
        assert (await client.request(head)).status == 200
    assert len(upstream.requests) == 3

    tight = await make_proxy(
        proxy_config(
            [upstream.url],
            [],
            listen={
                "host": "127.0.0.1",
                "port": 0,
                "max_request_target": 256,
                "max_header_bytes": 1024,
                "max_header_fields": 8,
            },
        )
    )
    for head, status in (
        (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: " + b"v" * 1100 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + many[:120] + b"\r\n", 431),
    ):
        client = await clients(tight.port)
        await client.send(head)
        await refused(client, status)
    assert len(upstream.requests) == 3


async def test_unterminated_growing_header_is_431_without_waiting_for_its_end(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, clients: ClientFactory
) -> None:
    upstream = await raw_upstream()
    proxy = await make_proxy(proxy_config([upstream.url], [], timeouts={"request_headers": "5s"}))
    client = await clients(proxy.port)
    await client.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Endless: ")
    # The value never ends; the proxy must not buffer it without bound until the deadline.
    sent = 0
    reply = asyncio.ensure_future(client.reader.read(65536))
    started = asyncio.get_running_loop().time()
    try:
        while not reply.done() and sent < 4_000_000:
            client.writer.write(b"v" * 16384)
            sent += 16384
            try:
                await asyncio.wait_for(client.writer.drain(), 2.0)
            except (ConnectionError, TimeoutError):
                break
            await asyncio.sleep(0)
        data = await asyncio.wait_for(reply, 3.0)
    finally:
        reply.cancel()
    elapsed = asyncio.get_running_loop().time() - started
    assert data.startswith(b"HTTP/1.1 431 "), data[:100]
    assert elapsed < 2.5
    assert sent < 1_000_000
    assert upstream.connections == 0


# --------------------------------------------------------------------------------------------
# Slow and silent clients.


@pytest.mark.parametrize(
    "head",
    [
        b"GET /slow HTTP/1.1\r\nHost: a\r\nX-A: b\r\nX-C: d\r\n\r\n",
        b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
    ],
    ids=["GET", "POST"],
)
async def test_trickling_client_is_cut_off_with_408(
    front: Any, clients: ClientFactory, head: bytes
) -> None:
    upstream, proxy = front
    client = await clients(proxy.port)
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def trickle() -> int:
        # One byte at a time: the whole head would take ~2 s, far beyond the 0.5 s allowed.
        for i, byte in enumerate(head):
            try:
                client.writer.write(bytes([byte]))
                await client.writer.drain()
            except ConnectionError:
                return i
            await asyncio.sleep(2.0 / len(head))
        return len(head)

    writer = asyncio.ensure_future(trickle())
    try:
        resp = await read_response(client.reader, timeout=3.0)
    finally:
        writer.cancel()
    assert resp.status == 408
    assert resp.value(b"connection") == b"close"
    assert await client.closed() == b""
    assert loop.time() - started < HEADER_TIMEOUT + 1.5
    await assert_only_sentinel_forwarded(upstream, proxy.port, clients)


@pytest.mark.parametrize("prefix", [b"G", b"GET /x", b"GET /x HTTP/1.1\r\nHost: a\r\nX-A"])
async def test_stalled_partial_head_is_cut_off_with_408(
    front: Any, clients: ClientFactory, prefix: bytes
) -> None:
    upstream, proxy = front
    client = await clients(proxy.port)
    started = asyncio.get_running_loop().time()
    await client.send(prefix)
    resp = await read_response(client.reader, timeout=3.0)
    assert resp.status == 408
    assert await client.closed() == b""
    assert asyncio.get_running_loop().time() - started < HEADER_TIMEOUT + 1.5
    await assert_only_sentinel_forwarded(upstream, proxy.port, clients)


async def test_silent_client_is_closed(front: Any, clients: ClientFactory) -> None:
    upstream, proxy = front
    client = await clients(proxy.port)
    started = asyncio.get_running_loop().time()
    assert await client.closed(timeout=3.0) == b""
    assert asyncio.get_running_loop().time() - started < HEADER_TIMEOUT + 1.5
    assert upstream.connections == 0


async def test_prompt_client_on_keep_alive_is_not_cut_off(
    front: Any, clients: ClientFactory
) -> None:
    upstream, proxy = front
    client = await clients(proxy.port)
    # Each head arrives in time; together they take longer than the head timeout.
    loop = asyncio.get_running_loop()
    started = loop.time()
    i = 0
    while loop.time() - started < HEADER_TIMEOUT * 2:
        resp = await client.request(b"GET /k/%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
        assert resp.status == 200
        i += 1
        await asyncio.sleep(0.05)
    assert upstream.connections == 1
