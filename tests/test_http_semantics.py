"""HTTP/1.1 semantics end to end through the real proxy: headers, framing, keep-alive, routing.

Most tests talk raw bytes on both sides: a raw socket client in front of the proxy and, where
what the upstream receives or sends must be exact, a tiny raw upstream (`RawUpstream`) behind
it. `RawUpstream`, `RawClient` and `read_response`, shared with test_malformed.py, live in
helpers/raw_http.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import yarl
from conftest import HOST, ProxyFactory, SampleFactory, Stack, proxy_config
from helpers.raw_http import Answer, ClientFactory, RawUpstreamFactory, Seen, answer_ok


def get(target: str, host: str = "app.example", extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def pattern(n: int) -> bytes:
    """The body of the sample upstream's /bytes/{n}: byte i is i % 256."""
    return bytes(i % 256 for i in range(n))


async def raw_front(raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, **kw: Any) -> Any:
    upstream = await raw_upstream(kw.pop("answer", answer_ok))
    proxy = await make_proxy(proxy_config([upstream.url], [], **kw))
    return upstream, proxy


# --------------------------------------------------------------------------------------------
# Hop-by-hop headers and the forwarding headers.


async def test_request_hop_by_hop_headers_dropped_and_forwarding_headers_set(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, clients: ClientFactory
) -> None:
    upstream, proxy = await raw_front(raw_upstream, make_proxy)
    client = await clients(proxy.port)
    resp = await client.request(
        b"GET /hop HTTP/1.1\r\n"
        b"Host: App.Example:8443\r\n"
        b"Connection: keep-alive, x-conn-named\r\n"
        b"X-Conn-Named: 1\r\n"
        b"Keep-Alive: timeout=5, X-Ka-Named\r\n"
        b"X-Ka-Named: 2\r\n"
        b"Proxy-Connection: X-PC-Named\r\n"
        b"X-Pc-Named: 3\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Trail\r\n"
        b"Upgrade: foo\r\n"
        b"Proxy-Authorization: Basic eDp5\r\n"
        b"X-Forwarded-For: 203.0.113.7\r\n"
        b"X-Forwarded-For: 198.51.100.2\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: spoofed.example\r\n"
        b"Via: 1.0 edge\r\n"
        b"X-End: kept\r\n"
        b"\r\n"
    )
    assert resp.status == 200
    [seen] = upstream.requests
    hop = {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"x-conn-named",
        b"x-ka-named",
        b"x-pc-named",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
    }
    assert hop.isdisjoint(seen.names()), seen.headers
    assert seen.values(b"x-end") == [b"kept"]
    assert seen.values(b"host") == [b"App.Example:8443"]
    assert seen.values(b"x-forwarded-for") == [b"203.0.113.7, 198.51.100.2, 127.0.0.1"]
    assert seen.values(b"x-forwarded-proto") == [b"http"]
    assert seen.values(b"x-forwarded-host") == [b"App.Example:8443"]
    assert seen.values(b"via") == [b"1.0 edge, 1.1 turnout"]


async def test_forwarding_headers_are_set_when_the_client_sent_none(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, clients: ClientFactory
) -> None:
    upstream, proxy = await raw_front(raw_upstream, make_proxy)
    client = await clients(proxy.port)
    assert (await client.request(get("/plain"))).status == 200
    [seen] = upstream.requests
    assert seen.values(b"x-forwarded-for") == [b"127.0.0.1"]
    assert seen.values(b"x-forwarded-proto") == [b"http"]
    assert seen.values(b"x-forwarded-host") == [b"app.example"]
    assert seen.values(b"via") == [b"1.1 turnout"]
    assert seen.values(b"connection") == []


def _hop_answer(framing: str) -> Answer:
    common = (
        b"Connection: X-Hop, keep-alive\r\n"
        b"X-Hop: 1\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Connection: X-Named\r\n"
        b"X-Named: 2\r\n"
        b"Upgrade: foo\r\n"
        b"Proxy-Authenticate: Basic\r\n"
        b"Set-Cookie: a=1\r\n"
        b"X-End: yes\r\n"
        b"Set-Cookie: b=2\r\n"
        b"Via: 1.1 cdn\r\n"
    )
    if framing == "length":
        reply = (
            b"HTTP/1.1 200 OK\r\n" + common + b"Trailer: X-Trail\r\nContent-Length: 5\r\n\r\nhello"
        )
    else:
        reply = (
            b"HTTP/1.1 200 OK\r\n"
            + common
            + b"Trailer: X-Trail\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"3\r\nhel\r\n2\r\nlo\r\n0\r\nX-Trail: t\r\n\r\n"
        )
    return lambda seen: reply


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_response_hop_by_hop_headers_dropped(
    raw_upstream: RawUpstreamFactory,
    make_proxy: ProxyFactory,
    clients: ClientFactory,
    framing: str,
) -> None:
    upstream, proxy = await raw_front(raw_upstream, make_proxy, answer=_hop_answer(framing))
    client = await clients(proxy.port)
    for _ in range(2):  # the connection stays usable after such a response
        resp = await client.request(get("/hop"))
        assert resp.status == 200
        assert resp.body == b"hello"
        hop = {
            b"connection",
            b"x-hop",
            b"keep-alive",
            b"proxy-connection",
            b"x-named",
            b"upgrade",
            b"trailer",
            b"x-trail",
            b"proxy-authenticate",
        }
        assert hop.isdisjoint(resp.names()), resp.headers
        assert resp.values(b"x-end") == [b"yes"]
        assert resp.values(b"set-cookie") == [b"a=1", b"b=2"]
        assert b", ".join(resp.values(b"via")) == b"1.1 cdn, 1.1 turnout"
    assert upstream.connections == 1


# --------------------------------------------------------------------------------------------
# Host, the request target and repeated headers pass through as they are.


@pytest.mark.parametrize(
    ("method", "target"),
    [
        (b"GET", b"/a%2Fb/c%2f?x=%2F&y=a+b"),
        (b"GET", b"/~user/!$&'()*+,;=:@-._~/x?q=a%20b&q=&=&&k==v;w"),
        (b"GET", b"//double//slash/./dot/../up/"),
        (b"GET", b"/p?a?b/c/?d"),
        (b"GET", b"/%E2%82%AC/caf%C3%A9"),
        (b"DELETE", b"/items/42?force=true"),
        (b"OPTIONS", b"*"),
    ],
)
async def test_host_and_request_target_forwarded_byte_for_byte(
    raw_upstream: RawUpstreamFactory,
    make_proxy: ProxyFactory,
    clients: ClientFactory,
    method: bytes,
    target: bytes,
) -> None:
    upstream, proxy = await raw_front(raw_upstream, make_proxy)
    client = await clients(proxy.port)
    resp = await client.request(
        method + b" " + target + b" HTTP/1.1\r\nHost: Weird-Host.Example:8080\r\n\r\n"
    )
    assert resp.status == 200
    [seen] = upstream.requests
    assert (seen.method, seen.target) == (method, target)
    assert seen.values(b"host") == [b"Weird-Host.Example:8080"]


@pytest.mark.parametrize(
    ("target", "host", "path"),
    [
        (b"http://app.example/a/b?x=1", b"app.example", b"/a/b?x=1"),
        (b"HTTP://user:pw@app.example:8080?q", b"app.example:8080", b"/?q"),
        (b"https://app.example", b"app.example", b"/"),
    ],
)
async def test_absolute_form_target_becomes_origin_form_with_its_host(
    raw_upstream: RawUpstreamFactory,
    make_proxy: ProxyFactory,
    clients: ClientFactory,
    target: bytes,
    host: bytes,
    path: bytes,
) -> None:
    """RFC 9112 3.2.2: the host of an absolute-form target replaces any Host field; the
    upstream gets the origin form (and never the user information)."""
    upstream, proxy = await raw_front(raw_upstream, make_proxy)
    client = await clients(proxy.port)
    resp = await client.request(b"GET " + target + b" HTTP/1.1\r\nHost: other.example\r\n\r\n")
    assert resp.status == 200
    [seen] = upstream.requests
    assert seen.target == path
    assert seen.values(b"host") == [host]
    assert seen.values(b"x-forwarded-host") == [host]
    refused = await client.request(b"GET http:///p HTTP/1.1\r\nHost: x\r\n\r\n")
    assert refused.status == 400


async def test_repeated_request_headers_kept_in_order(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, clients: ClientFactory
) -> None:
    upstream, proxy = await raw_front(raw_upstream, make_proxy)
    client = await clients(proxy.port)
    resp = await client.request(
        get("/repeat", extra="X-Foo: 1\r\nX-Bar: a\r\nX-Foo: 2\r\nX-Foo: 3, 4\r\nX-Bar: b\r\n")
    )
    assert resp.status == 200
    [seen] = upstream.requests
    assert seen.values(b"x-foo") == [b"1", b"2", b"3, 4"]
    assert seen.values(b"x-bar") == [b"a", b"b"]
    ours = [(n, v) for n, v in seen.headers if n.lower() in (b"x-foo", b"x-bar")]
    assert ours == [
        (b"X-Foo", b"1"),
        (b"X-Bar", b"a"),
        (b"X-Foo", b"2"),
        (b"X-Foo", b"3, 4"),
        (b"X-Bar", b"b"),
    ]


async def test_two_set_cookie_from_the_sample_upstream_kept_in_order(stack: Stack) -> None:
    async with stack.session.get(stack.url + "/set-cookies") as resp:
        assert resp.status == 200
        assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert await resp.text() == "cookies"


async def test_sample_upstream_sees_raw_path_and_headers(stack: Stack) -> None:
    # encoded=True: the client itself must not normalise %2F either.
    async with stack.session.get(
        yarl.URL(stack.url + "/headers/a%2Fb?x=%2F", encoded=True),
        headers={"X-Foo": "1", "Host": "front.example"},
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["raw_path"] == "/headers/a%2Fb?x=%2F"
    pairs = [(n.lower(), v) for n, v in body["headers"]]
    assert ("host", "front.example") in pairs
    assert ("x-forwarded-host", "front.example") in pairs


# --------------------------------------------------------------------------------------------
# Expect: 100-continue, pipelining, keep-alive.


async def test_expect_100_continue(stack: Stack, clients: ClientFactory) -> None:
    client = await clients(stack.proxy.port)
    body = b"x" * 3000
    await client.send(
        b"POST /sink HTTP/1.1\r\nHost: app.example\r\nExpect: 100-continue\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    interim = await client.response(timeout=3.0)
    assert interim.status == 100
    await client.send(body)
    final = await client.response()
    assert final.status == 200
    assert final.json()["bytes"] == len(body)
    # The connection is still good for the next request.
    again = await client.request(get("/headers"))
    assert again.status == 200


async def test_expect_100_continue_with_chunked_body(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, clients: ClientFactory
) -> None:
    upstream, proxy = await raw_front(raw_upstream, make_proxy)
    client = await clients(proxy.port)
    await client.send(
        b"PUT /up HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert (await client.response(timeout=3.0)).status == 100
    await client.send(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert (await client.response()).status == 200
    [seen] = upstream.requests
    assert seen.body == b"hello world"
    assert seen.values(b"expect") == []


async def test_pipelined_requests_answered_in_order(stack: Stack, clients: ClientFactory) -> None:
    client = await clients(stack.proxy.port)
    # Two in one write; the first one is the slow one.
    await client.send(get("/delay/60") + get("/headers/second"))
    first = await client.response()
    second = await client.response()
    assert first.json()["delay_ms"] == 60
    assert second.json()["raw_path"] == "/headers/second"
    # Three in one write, one of them with a body.
    body = b"0123456789" * 10
    await client.send(
        get("/delay/40")
        + b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        + get("/headers/third")
    )
    answers = [await client.response() for _ in range(3)]
    assert [r.status for r in answers] == [200, 200, 200]
    assert answers[0].json()["delay_ms"] == 40
    assert answers[1].json()["bytes"] == len(body)
    assert answers[2].json()["raw_path"] == "/headers/third"


async def test_keep_alive_reuses_one_upstream_connection(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, clients: ClientFactory
) -> None:
    upstream, proxy = await raw_front(raw_upstream, make_proxy)
    client = await clients(proxy.port)
    for i in range(30):
        resp = await client.request(get(f"/seq/{i}"))
        assert resp.status == 200
        assert resp.body == b"ok"
    assert upstream.targets == [f"/seq/{i}".encode() for i in range(30)]
    assert upstream.connections == 1
    assert len(proxy.router.pools["blue"][0].connections) == 1


async def test_client_connection_close_is_not_forwarded(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, clients: ClientFactory
) -> None:
    upstream, proxy = await raw_front(raw_upstream, make_proxy)
    for i in range(3):
        client = await clients(proxy.port)
        resp = await client.request(get(f"/close/{i}", extra="Connection: close\r\n"))
        assert resp.status == 200
        assert resp.value(b"connection") == b"close"
        assert await client.closed() == b""
    # Each client asked to close its own connection; the upstream connection stays pooled.
    assert upstream.connections == 1
    assert all(s.values(b"connection") == [] for s in upstream.requests)


async def test_upstream_connection_close_is_not_relayed(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, clients: ClientFactory
) -> None:
    def answer(seen: Seen) -> bytes:
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye"

    upstream, proxy = await raw_front(raw_upstream, make_proxy, answer=answer)
    client = await clients(proxy.port)
    for i in range(3):
        resp = await client.request(get(f"/bye/{i}"))
        assert resp.body == b"bye"
        assert resp.value(b"connection") is None
    # The client's connection stayed open; each upstream connection served one request.
    assert upstream.connections == 3


async def test_keep_alive_with_the_sample_upstream(stack: Stack, clients: ClientFactory) -> None:
    client = await clients(stack.proxy.port)
    for i in range(10):
        resp = await client.request(get(f"/headers/{i}"))
        assert resp.status == 200
    assert len(stack.proxy.router.pools["blue"][0].connections) == 1


# --------------------------------------------------------------------------------------------
# HTTP/1.0 clients, HEAD, bodiless statuses.


async def test_http10_client_gets_close_delimited_body_for_chunked_upstream(
    stack: Stack, clients: ClientFactory
) -> None:
    client = await clients(stack.proxy.port)
    await client.send(b"GET /bytes/5000?chunked=1 HTTP/1.0\r\n\r\n")
    raw = await client.closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 "))
    assert b"transfer-encoding" not in head.lower()
    assert body == pattern(5000)
    length = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    assert length in ([], [b"Content-Length: 5000"])


async def test_http10_keep_alive_client(stack: Stack, clients: ClientFactory) -> None:
    client = await clients(stack.proxy.port)
    for n in (10, 300):
        resp = await client.request(b"GET /bytes/%d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" % n)
        assert resp.status == 200
        assert resp.value(b"content-length") == b"%d" % n
        assert resp.value(b"connection") == b"keep-alive"
        assert resp.body == pattern(n)
    # Without keep-alive the proxy closes after the response.
    resp = await client.request(b"GET /bytes/7 HTTP/1.0\r\n\r\n")
    assert resp.body == pattern(7)
    assert await client.closed() == b""


async def test_http10_request_is_forwarded_with_via_1_0(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, clients: ClientFactory
) -> None:
    upstream, proxy = await raw_front(raw_upstream, make_proxy)
    client = await clients(proxy.port)
    resp = await client.request(b"GET /old HTTP/1.0\r\nHost: legacy.example\r\n\r\n")
    assert resp.status == 200
    [seen] = upstream.requests
    assert seen.target == b"/old"
    assert seen.values(b"host") == [b"legacy.example"]
    # Via names the protocol the proxy received the message with (RFC 9110 §7.6.3).
    assert seen.values(b"via") == [b"1.0 turnout"]


# Each request's version is its own however its head arrives: the proxy reads "HTTP/1.1"
# from the request line where that line lies whole at the start of what it parses, and asks
# the parser otherwise (split lines, blank lines first, a body that looks like a request).
FAKE_LINE = b"x\n0\r\n\r\nGET /b HTTP/1.1\r\n"  # chunk data that ends a read where a head would
VERSION_DELIVERIES: dict[str, tuple[list[bytes], list[tuple[bytes, bytes]]]] = {
    "pipelined": (
        [
            b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
            b"GET /b HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n"
            b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n"
        ],
        [(b"/a", b"1.1 turnout"), (b"/b", b"1.0 turnout"), (b"/c", b"1.1 turnout")],
    ),
    "line split in the version": (
        [b"GET /a HTTP/1.", b"0\r\nHost: h\r\n\r\n"],
        [(b"/a", b"1.0 turnout")],
    ),
    "line split in the target": (
        [b"GET /a", b"b HTTP/1.1\r\nHost: h\r\n\r\n"],
        [(b"/ab", b"1.1 turnout")],
    ),
    "blank lines first": (
        [b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n\r\nGET /b HTTP/1.0\r\nHost: h\r\n\r\n"],
        [(b"/a", b"1.1 turnout"), (b"/b", b"1.0 turnout")],
    ),
    "a chunk that looks like a request line": (
        [
            b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n%b\r\n0\r\n\r\n"
            % (len(FAKE_LINE), FAKE_LINE)
            + b"GET /b HTTP/1.0\r\nHost: h\r\n\r\n"
        ],
        [(b"/a", b"1.1 turnout"), (b"/b", b"1.0 turnout")],
    ),
}


@pytest.mark.parametrize("delivery", list(VERSION_DELIVERIES))
async def test_each_request_is_forwarded_with_its_own_version(
    raw_upstream: RawUpstreamFactory,
    make_proxy: ProxyFactory,
    clients: ClientFactory,
    delivery: str,
) -> None:
    writes, expected = VERSION_DELIVERIES[delivery]
    upstream, proxy = await raw_front(raw_upstream, make_proxy)
    client = await clients(proxy.port)
    for n, data in enumerate(writes):
        await client.send(data)
        if n < len(writes) - 1:
            # The proxy has parsed this part: the rest arrives in a read of its own.
            async with asyncio.timeout(5):
                while not any(c.in_head for c in proxy.serving.connections):
                    await asyncio.sleep(0.005)
    for _ in expected:
        assert (await client.response()).status == 200
    assert [(seen.target, *seen.values(b"via")) for seen in upstream.requests] == expected


async def test_client_half_close_after_request_still_gets_response(
    stack: Stack, clients: ClientFactory
) -> None:
    client = await clients(stack.proxy.port)
    client.writer.write(b"GET /delay/30 HTTP/1.0\r\n\r\n")
    client.writer.write_eof()  # like `nc -N`: the request is complete, nothing more follows
    raw = await client.closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), raw[:200]
    assert json.loads(body)["delay_ms"] == 30


@pytest.mark.parametrize("query", ["", "?chunked=1"])
async def test_head_has_no_body_and_connection_stays_usable(
    stack: Stack, clients: ClientFactory, query: str
) -> None:
    client = await clients(stack.proxy.port)
    head = await client.request(
        f"HEAD /bytes/100{query} HTTP/1.1\r\nHost: a\r\n\r\n".encode(), head=True
    )
    assert head.status == 200
    assert head.value(b"content-length") in (None, b"100")
    resp = await client.request(get(f"/bytes/100{query}"))
    assert resp.status == 200
    assert resp.body == pattern(100)
    # HEAD and GET pipelined in one write.
    await client.send(
        f"HEAD /bytes/50{query} HTTP/1.1\r\nHost: a\r\n\r\n".encode() + get("/bytes/3")
    )
    assert (await client.response(head=True)).status == 200
    assert (await client.response()).body == pattern(3)


async def test_head_to_raw_upstream_declaring_a_length(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, clients: ClientFactory
) -> None:
    def answer(seen: Seen) -> bytes:
        if seen.method == b"HEAD":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
        return answer_ok(seen)

    upstream, proxy = await raw_front(raw_upstream, make_proxy, answer=answer)
    client = await clients(proxy.port)
    for _ in range(2):
        head = await client.request(b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n", head=True)
        assert head.value(b"content-length") == b"1234"
        assert (await client.request(get("/y"))).body == b"ok"
    # The client's connection stays usable; upstream, a HEAD answer that announced a body is
    # never pooled (an application that writes its body for HEAD too could send it after the
    # next request went out): each GET after a HEAD opens a connection, which the next HEAD
    # reuses.
    assert upstream.connections == 3


async def test_204_and_304_relayed_without_body(stack: Stack, clients: ClientFactory) -> None:
    client = await clients(stack.proxy.port)
    for code in (204, 304, 204):
        resp = await client.request(get(f"/status/{code}"))
        assert resp.status == code
        assert resp.value(b"transfer-encoding") is None
    # Had the proxy framed a body after a 204/304, this response would be out of step.
    resp = await client.request(get("/bytes/4"))
    assert resp.status == 200
    assert resp.body == pattern(4)


async def test_304_with_declared_length_from_raw_upstream(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, clients: ClientFactory
) -> None:
    def answer(seen: Seen) -> bytes:
        if seen.target == b"/cached":
            return b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 10\r\n\r\n'
        if seen.target == b"/empty":
            return b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"
        return answer_ok(seen)

    upstream, proxy = await raw_front(raw_upstream, make_proxy, answer=answer)
    client = await clients(proxy.port)
    resp = await client.request(get("/cached", extra='If-None-Match: "v1"\r\n'))
    assert resp.status == 304
    assert resp.value(b"etag") == b'"v1"'
    resp = await client.request(get("/empty"))
    assert resp.status == 204
    assert resp.value(b"transfer-encoding") is None
    assert (await client.request(get("/after"))).body == b"ok"
    assert upstream.connections == 1


# --------------------------------------------------------------------------------------------
# The proxy's own error responses.


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A URL nobody listens on: the port is bound (so nobody else takes it) but not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        yield f"http://{HOST}:{sock.getsockname()[1]}"


async def test_no_healthy_upstream_is_a_fast_503_with_json(
    make_proxy: ProxyFactory, clients: ClientFactory, refused_url: str
) -> None:
    proxy = await make_proxy(proxy_config([refused_url], []))
    client = await clients(proxy.port)
    for method in (b"GET", b"POST"):
        resp = await client.request(
            method + b" /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
        )
        assert resp.status == 503
        assert resp.value(b"retry-after") is not None
        assert resp.value(b"content-type") == b"application/json"
        body = resp.json()
        assert {"error", "detail", "pool"} <= body.keys()
        assert body["error"] == "no_upstream"
        assert body["pool"] == "blue"
        assert len(resp.body) < 512


async def test_no_response_headers_in_time_is_504_with_json(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory, clients: ClientFactory
) -> None:
    upstream, proxy = await raw_front(
        raw_upstream, make_proxy, answer=lambda seen: None, timeouts={"response_headers": "300ms"}
    )
    client = await clients(proxy.port)
    resp = await client.request(b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert resp.status == 504
    body = resp.json()
    assert body["pool"] == "blue"
    assert body["error"]
    assert body["detail"]
    assert upstream.targets == [b"/slow"]


# --------------------------------------------------------------------------------------------
# Override header and version stickiness.


async def _pool_of(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> str:
    async with session.get(url, headers=headers) as resp:
        assert resp.status == 200
        await resp.read()
        return resp.headers["X-Upstream"]


async def test_override_header_forces_a_pool(stack: Stack) -> None:
    url = stack.url + "/override"
    session = stack.session
    for _ in range(5):
        assert await _pool_of(session, url, {"X-Turnout-Pool": "green"}) == "green"
        assert await _pool_of(session, url, {"x-turnout-pool": " GREEN "}) == "green"
        assert await _pool_of(session, url, {}) == "blue"
    stack.proxy.control.put_split(100)
    for _ in range(5):
        assert await _pool_of(session, url, {"X-Turnout-Pool": "blue"}) == "blue"
        assert await _pool_of(session, url, {}) == "green"
        # An unknown value forces nothing.
        assert await _pool_of(session, url, {"X-Turnout-Pool": "purple"}) == "green"


async def test_override_header_null_turns_forcing_off(
    sample: SampleFactory, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    blue = await sample("blue")
    green = await sample("green")
    proxy = await make_proxy(proxy_config([blue.url], [green.url], override_header=None))
    url = f"http://{HOST}:{proxy.port}/headers"
    for _ in range(3):
        async with session.get(url, headers={"X-Turnout-Pool": "green"}) as resp:
            assert (resp.status, resp.headers["X-Upstream"]) == (200, "blue")
            received = {k.lower(): v for k, v in (await resp.json())["headers"]}
        assert received["x-turnout-pool"] == "green"  # passed on as any other field


async def test_sticky_cookie_moves_clients_only_blue_to_green(
    sample: SampleFactory, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    blue = await sample("blue")
    green = await sample("green")
    proxy = await make_proxy(proxy_config([blue.url], [green.url], sticky={"cookie": "sid"}))
    url = f"http://{HOST}:{proxy.port}/sticky"
    keys = [f"client-{i:03d}" for i in range(200)]
    limit = asyncio.Semaphore(16)

    async def pool_of(key: str) -> str:
        async with limit:
            return await _pool_of(session, url, {"Cookie": f"theme=dark; sid={key}; x=1"})

    previous: set[str] = set()
    for split in (20, 50, 80):
        proxy.control.put_split(split)
        first = await asyncio.gather(*(pool_of(k) for k in keys))
        second = await asyncio.gather(*(pool_of(k) for k in reversed(keys)))
        assert first == second[::-1], f"a cookie changed pool at split {split}"
        green_keys = {k for k, p in zip(keys, first, strict=True) if p == "green"}
        assert previous <= green_keys, f"clients moved green->blue at split {split}"
        share = 100 * len(green_keys) / len(keys)
        assert abs(share - split) <= 10, (split, share)
        previous = green_keys
