"""Upstream faults through the real proxy map to clear statuses (DESIGN.md guarantees 2 and 5).

Faults that the sample upstream cannot produce come from hand-written upstreams on asyncio
streams, which send exactly the bytes each test needs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from conftest import HOST, ProxyFactory, Sample, SampleFactory, proxy_config, raw_request
from helpers.scripted import Parsed, RawUpstream, Script, parse_response, read_head

from proxy.http.headers import MAX_RESPONSE_HEAD
from proxy.runtime import Proxy

MiB = 1024 * 1024

# -- helpers -------------------------------------------------------------------------------


# Health checks far apart, so that an upstream stopped after the proxy started still looks
# healthy and the data path meets the dead port itself.
SLOW_CHECKS: dict[str, Any] = {"health_check": {"interval": "60s"}}


async def stop(upstream: Sample) -> str:
    """Stop a sample upstream that passed its first health check; returns its URL."""
    await upstream.runner.cleanup()
    return upstream.url


RawFactory = Callable[[Script], Awaitable[RawUpstream]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawFactory]:
    upstreams: list[RawUpstream] = []

    async def make(script: Script) -> RawUpstream:
        upstream = RawUpstream(script)
        upstream.server = await asyncio.start_server(upstream.handle, HOST, 0)
        upstreams.append(upstream)
        return upstream

    yield make
    for upstream in upstreams:
        assert upstream.server is not None
        upstream.server.close()
        for task in list(upstream.tasks):
            task.cancel()
        await asyncio.gather(*upstream.tasks, return_exceptions=True)
        await upstream.server.wait_closed()


async def wait_closed_by_peer(reader: asyncio.StreamReader) -> None:
    """Keep the connection open until the proxy closes it (bounded by the script timeout)."""
    while await reader.read(65536):
        pass


def answer(payload: bytes, *, close: bool = True) -> Script:
    """A script that answers the request with `payload`, then closes (or waits)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(payload)
        await writer.drain()
        if not close:
            await wait_closed_by_peer(reader)

    return script


async def get_raw(proxy: Proxy, path: str) -> bytes:
    request = b"GET %b HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n" % path.encode()
    return await raw_request(proxy.port, request)


def url_of(proxy: Proxy) -> str:
    return f"http://{HOST}:{proxy.port}"


async def expect_cut(session: aiohttp.ClientSession, proxy: Proxy, path: str) -> Parsed:
    """The client must see an error, never a complete-looking response; returns the raw view."""
    # The cut may come before the head is whole (the request fails) or after (the body does).
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):  # noqa: PT012
        async with session.get(url_of(proxy) + path) as resp:
            assert resp.status == 200
            await resp.read()
    parsed = parse_response(await get_raw(proxy, path))
    assert not parsed.complete, parsed
    return parsed


NO_RETRIES: dict[str, Any] = {"retries": {"attempts": 0}}

# -- connect failure, response-head timeout ------------------------------------------------------


async def test_connect_failure_is_502_naming_the_pool_not_the_address(
    sample: SampleFactory,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
) -> None:
    doomed = await sample("doomed")
    green = await sample("green")
    proxy = await make_proxy(proxy_config([doomed.url], [green.url], **NO_RETRIES, **SLOW_CHECKS))
    dead = await stop(doomed)
    async with session.get(url_of(proxy) + "/anything") as resp:
        assert resp.status == 502
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body["status"] == 502
    assert body["pool"] == "blue"
    assert body["upstream"] == "blue/0"
    assert body["detail"] == "connect to blue/0 failed: Connection refused"
    assert dead.removeprefix("http://") not in json.dumps(body)
    assert proxy.router.pools["blue"][0].snapshot().failures == 1


async def test_no_response_headers_in_time_is_504(
    sample: SampleFactory, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    blue = await sample("blue")
    green = await sample("green")
    proxy = await make_proxy(
        proxy_config([blue.url], [green.url], timeouts={"response_headers": "0.3s"})
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    # 1.5 s rather than longer: the sample finishes the handler before its teardown ends.
    async with session.get(url_of(proxy) + "/delay/1500") as resp:
        assert resp.status == 504
        body = await resp.json()
    elapsed = loop.time() - started
    assert 0.29 <= elapsed < 1.2, elapsed
    assert body["status"] == 504
    assert body["pool"] == "blue"
    # The late answer must never reach a later request: that connection is gone.
    for i in range(3):
        async with session.get(url_of(proxy) + f"/headers?i={i}") as resp:
            assert resp.status == 200
            assert (await resp.json())["raw_path"] == f"/headers?i={i}"


async def test_silent_upstream_is_504_and_hung_up_on(
    raw_upstream: RawFactory, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    hung_up = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await wait_closed_by_peer(reader)
        hung_up.set()

    upstream = await raw_upstream(silent)
    proxy = await make_proxy(
        proxy_config([upstream.url], [upstream.url], timeouts={"response_headers": "0.3s"})
    )
    async with session.get(url_of(proxy) + "/") as resp:
        assert resp.status == 504
        assert (await resp.json())["upstream"] == "blue/0"
    async with asyncio.timeout(5):
        await hung_up.wait()
    # retries.on lists answers with status 504; the proxy's own timeout would be "timeout".
    assert upstream.connections == 1


# -- bodies cut short ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1000, 4 * MiB])
async def test_body_cut_short_by_the_upstream_cuts_the_client(
    sample: SampleFactory, make_proxy: ProxyFactory, session: aiohttp.ClientSession, n: int
) -> None:
    blue = await sample("blue")
    proxy = await make_proxy(proxy_config([blue.url], [blue.url]))
    parsed = await expect_cut(session, proxy, f"/cut/{n}")
    if parsed.status:
        assert parsed.status == 200
        assert parsed.headers["content-length"] == str(2 * n)
        assert len(parsed.body) < 2 * n
    assert proxy.router.pools["blue"][0].snapshot().failures == 2


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("payload", "close"),
    [
        pytest.param(CHUNKED_HEAD + b"5\r\nhello\r\n", True, id="closed-after-one-chunk"),
        pytest.param(CHUNKED_HEAD + b"a\r\nhello", True, id="closed-mid-chunk"),
    ],
)
async def test_chunked_body_cut_short_cuts_the_client(
    raw_upstream: RawFactory,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    payload: bytes,
    close: bool,
) -> None:
    upstream = await raw_upstream(answer(payload, close=close))
    proxy = await make_proxy(proxy_config([upstream.url], [upstream.url]))
    parsed = await expect_cut(session, proxy, "/")
    if parsed.status:
        assert parsed.status == 200
        assert b"zz" not in parsed.body


async def test_bad_chunk_size_after_relaying_began_cuts_the_client(
    raw_upstream: RawFactory, make_proxy: ProxyFactory
) -> None:
    relayed = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(CHUNKED_HEAD + b"5\r\nhello\r\n")
        await writer.drain()
        await relayed.wait()
        writer.write(b"zz\r\n")
        await writer.drain()
        await wait_closed_by_peer(reader)

    upstream = await raw_upstream(script)
    proxy = await make_proxy(proxy_config([upstream.url], [upstream.url]))
    reader, writer = await asyncio.open_connection(HOST, proxy.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(5):
            data = await reader.readuntil(b"hello")
            relayed.set()
            data += await reader.read(-1)
    finally:
        writer.close()
    parsed = parse_response(data)
    assert parsed.status == 200
    assert not parsed.complete, data
    assert b"zz" not in data


@pytest.mark.parametrize(
    "payload",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it",
        b"HTTP/1.0 200 OK\r\n\r\nall of it",
    ],
    ids=["http/1.1", "http/1.0"],
)
async def test_body_ended_by_close_is_complete(
    raw_upstream: RawFactory,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    payload: bytes,
) -> None:
    """Without Content-Length or chunking the upstream's close is the body's legitimate end."""
    upstream = await raw_upstream(answer(payload))
    proxy = await make_proxy(proxy_config([upstream.url], [upstream.url]))
    async with session.get(url_of(proxy) + "/") as resp:
        assert resp.status == 200
        assert await resp.read() == b"all of it"
    parsed = parse_response(await get_raw(proxy, "/"))
    assert parsed.complete
    assert parsed.body == b"all of it"


# -- invalid responses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"garbage, not http\r\n\r\n", id="garbage"),
        pytest.param(b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n", id="bad-status-code"),
        pytest.param(b"HTTX/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", id="bad-protocol"),
        pytest.param(b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n", id="header-without-colon"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            id="two-content-lengths",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n",
            id="content-length-and-chunked",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello", id="negative-length"),
        pytest.param(b"HTTP/1.1 600 OK\r\nContent-Length: 5\r\n\r\nhello", id="status-600"),
        pytest.param(b"HTTP/1.1 099 OK\r\nContent-Length: 5\r\n\r\nhello", id="status-099"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
            id="bad-chunk-size-in-the-head-read",
        ),
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n",
            id="101-without-upgrade",
        ),
    ],
)
async def test_invalid_upstream_response_is_502(
    raw_upstream: RawFactory, make_proxy: ProxyFactory, payload: bytes
) -> None:
    # The upstream keeps the connection open: the proxy must judge the bytes it got.
    upstream = await raw_upstream(answer(payload, close=False))
    proxy = await make_proxy(proxy_config([upstream.url], [upstream.url], **NO_RETRIES))
    data = await get_raw(proxy, "/")
    parsed = parse_response(data)
    assert parsed.complete, data
    assert parsed.status == 502, data
    assert parsed.headers["content-type"] == "application/json"
    assert b'"pool": "blue"' in parsed.body
    # Nothing of what the upstream sent is relayed.
    for marker in (b"garbage", b"hello", b"Switching", b"HTTX"):
        assert marker not in data


# -- bytes after the end of a response (response desync) -------------------------------------

HONEST = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhonest"
EVIL = b"HTTP/1.1 200 OK\r\nSet-Cookie: sid=evil\r\nContent-Length: 4\r\n\r\nevil"
PIPELINED = b"%b /first HTTP/1.1\r\nHost: t\r\n\r\nGET /second HTTP/1.1\r\nHost: t\r\n\r\n"


def first_then_honest(first: bytes) -> Script:
    """Answers the first request of the first connection with `first`, every other request
    honestly, for as long as the proxy keeps the connection."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> None:
        writer.write(first if i == 0 else HONEST)
        await writer.drain()
        while True:
            await read_head(reader)
            writer.write(HONEST)
            await writer.drain()

    return script


@pytest.mark.parametrize(
    ("method", "first"),
    [
        pytest.param(b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + EVIL, id="full"),
        pytest.param(
            b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + EVIL[:20], id="partial"
        ),
        pytest.param(b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n" + EVIL, id="head"),
        pytest.param(b"GET", b"HTTP/1.1 204 No Content\r\n\r\n" + EVIL, id="204"),
        pytest.param(b"GET", b"HTTP/1.1 304 Not Modified\r\n\r\n" + EVIL, id="304"),
    ],
)
async def test_bytes_after_a_response_never_answer_the_next_request(
    raw_upstream: RawFactory, make_proxy: ProxyFactory, method: bytes, first: bytes
) -> None:
    """An upstream writes more than the response it owed, in the same write: the response is
    relayed, the connection is closed instead of pooled, and the next request (here pipelined
    behind it, so it is sent the moment the first ends) gets its own answer."""
    upstream = await raw_upstream(first_then_honest(first))
    proxy = await make_proxy(proxy_config([upstream.url], [upstream.url], **NO_RETRIES))
    data = await raw_request(
        proxy.port, PIPELINED % method + b"GET /c HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    assert b"evil" not in data, data
    assert data.count(b"HTTP/1.1 ") == 3, data
    assert data.endswith(b"honest"), data
    assert upstream.connections == 2


async def test_head_answer_announcing_a_body_is_not_reused(
    raw_upstream: RawFactory, make_proxy: ProxyFactory
) -> None:
    """A HEAD answer whose head announces a body may be followed by that body in a later read,
    after the next request went out on the connection: such a connection is never reused."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> None:
        if i > 0:
            await first_then_honest(HONEST)(reader, writer, i)
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
        await writer.drain()
        await read_head(reader)  # the next request, if the proxy reused this connection
        writer.write(EVIL)
        await writer.drain()
        await wait_closed_by_peer(reader)

    upstream = await raw_upstream(script)
    proxy = await make_proxy(proxy_config([upstream.url], [upstream.url], **NO_RETRIES))
    head = b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n"
    get = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    data = await raw_request(proxy.port, head + get)
    assert b"evil" not in data, data
    assert data.endswith(b"honest"), data
    assert upstream.connections == 2


def head_of(size: int) -> bytes:
    """A 200 response whose head is `size` bytes long, most of it in X-Filler fields."""
    start, end = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", b"\r\n"
    filler = size - len(start) - len(end)
    fields = b"".join(b"X-Filler-%05d: %b\r\n" % (i, b"f" * 1000) for i in range(filler // 1019))
    rest = filler - len(fields)
    assert rest >= 12
    fields += b"X-Last: %b\r\n" % (b"f" * (rest - 10))
    head = start + fields + end
    assert len(head) == size
    return head + b"ok"


def in_pieces(payload: bytes, size: int) -> Script:
    """A script that sends `payload` in pieces of `size` bytes, each one written on its own."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        for i in range(0, len(payload), size):
            writer.write(payload[i : i + size])
            await writer.drain()
            await asyncio.sleep(0)
        await wait_closed_by_peer(reader)

    return script


@pytest.mark.parametrize("pieces", [0, 4096], ids=["one-write", "in-pieces"])
async def test_response_head_over_the_limit_is_502(
    raw_upstream: RawFactory, make_proxy: ProxyFactory, pieces: int
) -> None:
    payload = head_of(MAX_RESPONSE_HEAD + 2048)
    script = in_pieces(payload, pieces) if pieces else answer(payload, close=False)
    upstream = await raw_upstream(script)
    proxy = await make_proxy(proxy_config([upstream.url], [upstream.url], **NO_RETRIES))
    data = await get_raw(proxy, "/")
    parsed = parse_response(data)
    assert parsed.status == 502, data[:200]
    assert b"response head too large" in parsed.body
    assert b"X-Filler" not in data


@pytest.mark.parametrize("pieces", [0, 4096], ids=["one-write", "in-pieces"])
async def test_response_head_under_the_limit_is_relayed(
    raw_upstream: RawFactory, make_proxy: ProxyFactory, pieces: int
) -> None:
    payload = head_of(MAX_RESPONSE_HEAD - 4096)
    script = in_pieces(payload, pieces) if pieces else answer(payload, close=False)
    upstream = await raw_upstream(script)
    proxy = await make_proxy(proxy_config([upstream.url], [upstream.url], **NO_RETRIES))
    parsed = parse_response(await get_raw(proxy, "/"))
    assert parsed.status == 200
    assert parsed.body == b"ok"
    assert len(parsed.headers) > 50


@pytest.mark.parametrize(
    "payload", [b"", b"HTTP/1.1 200 OK\r\nContent-Le"], ids=["nothing", "half-a-head"]
)
async def test_upstream_closing_without_an_answer_is_502(
    raw_upstream: RawFactory,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
    payload: bytes,
) -> None:
    upstream = await raw_upstream(answer(payload))
    proxy = await make_proxy(proxy_config([upstream.url], [upstream.url], **NO_RETRIES))
    async with session.get(url_of(proxy) + "/") as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["pool"] == "blue"
    assert upstream.connections == 1


# -- retries and failover ------------------------------------------------------------------------


async def test_get_is_retried_on_another_upstream(
    sample: SampleFactory,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
) -> None:
    doomed = await sample("doomed")
    blue = await sample("blue")
    green = await sample("green")
    proxy = await make_proxy(
        proxy_config([doomed.url, blue.url], [green.url], balancer="round_robin", **SLOW_CHECKS)
    )
    await stop(doomed)
    for i in range(10):
        async with session.get(url_of(proxy) + f"/r/{i}") as resp:
            assert resp.status == 200
            assert resp.headers["X-Upstream"] == "blue"
            assert (await resp.json())["path"] == f"/r/{i}"
    dead, live = (u.snapshot() for u in proxy.router.pools["blue"])
    assert dead.failures >= 1  # the dead upstream was tried, and every try was retried
    assert live.requests == 10


async def test_post_is_retried_after_a_connect_error(
    sample: SampleFactory,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
) -> None:
    """A POST whose connection was refused reached no upstream: it is re-sent, body and all,
    like Envoy's connect-failure retry (a POST an upstream answered is never re-sent:
    tests/test_resilience.py::test_post_is_not_retried_on_503_but_get_is)."""
    doomed = await sample("doomed")
    blue = await sample("blue")
    green = await sample("green")
    proxy = await make_proxy(
        proxy_config([doomed.url, blue.url], [green.url], balancer="round_robin", **SLOW_CHECKS)
    )
    await stop(doomed)
    for i in range(4):
        payload = b"payload %d" % i
        async with session.post(url_of(proxy) + "/sink", data=payload) as resp:
            assert resp.status == 200
            assert resp.headers["X-Upstream"] == "blue"
            assert (await resp.json())["bytes"] == len(payload)
    dead = proxy.router.pools["blue"][0].snapshot()
    assert dead.failures >= 1, "no POST was sent toward the dead upstream"
    assert proxy.observed.pool_stats["blue"].retries == {"connect_error": dead.failures}


async def test_unreachable_pool_fails_over_to_the_other_pool(
    dead_url: Callable[[], str],
    sample: SampleFactory,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
) -> None:
    green = await sample("green")
    proxy = await make_proxy(proxy_config([dead_url(), dead_url()], [green.url]))
    for i in range(10):
        async with session.get(url_of(proxy) + f"/f/{i}") as resp:
            assert resp.status == 200
            assert resp.headers["X-Upstream"] == "green"


# -- pooled connections closed by the upstream ------------------------------------------------


def keep_alive_response(index: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Connection: %d\r\n\r\nok" % index


async def test_pooled_connection_closed_after_a_response_is_not_reused(
    raw_upstream: RawFactory, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    """The upstream answers with keep-alive, then closes the socket once the answer is out."""
    closed: list[asyncio.Event] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> None:
        closed.append(asyncio.Event())
        writer.write(keep_alive_response(i))
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        closed[i].set()

    upstream = await raw_upstream(script)
    proxy = await make_proxy(proxy_config([upstream.url], [upstream.url], **NO_RETRIES))
    for i in range(3):
        async with session.get(url_of(proxy) + "/") as resp:
            assert resp.status == 200
            assert resp.headers["X-Connection"] == str(i)
            assert await resp.read() == b"ok"
        async with asyncio.timeout(5):
            await closed[i].wait()
    assert upstream.connections == 3


async def test_pooled_connection_closed_when_reused_is_replaced(
    raw_upstream: RawFactory,
    sample: SampleFactory,
    make_proxy: ProxyFactory,
    session: aiohttp.ClientSession,
) -> None:
    """The upstream keeps the first connection open, then closes it without an answer when the
    next request arrives on it (its keep-alive timer fired just then): the proxy sends the
    request again on a fresh connection, even with retries off."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> None:
        writer.write(keep_alive_response(i))
        await writer.drain()
        if i == 0:
            await read_head(reader)
            return  # closed without an answer
        await wait_closed_by_peer(reader)

    upstream = await raw_upstream(script)
    green = await sample("green")
    proxy = await make_proxy(proxy_config([upstream.url], [green.url], **NO_RETRIES))
    for expected in ("0", "1"):
        async with session.get(url_of(proxy) + "/") as resp:
            assert resp.status == 200
            assert resp.headers["X-Connection"] == expected
            assert await resp.read() == b"ok"
    assert upstream.connections == 2


async def test_retried_status_goes_to_another_upstream(
    sample: SampleFactory, make_proxy: ProxyFactory, session: aiohttp.ClientSession
) -> None:
    blue = await sample("blue", error_rate=1.0, error_status=503)
    green = await sample("green")
    proxy = await make_proxy(proxy_config([blue.url], [green.url]))
    async with session.get(url_of(proxy) + "/x") as resp:
        assert resp.status == 200
        assert resp.headers["X-Upstream"] == "green"
    # A POST is not retried: the upstream's own answer comes back.
    async with session.post(url_of(proxy) + "/x", data=b"payload") as resp:
        assert resp.status == 503
        assert resp.headers["X-Upstream"] == "blue"
        assert (await resp.json())["error"] == "injected"


@pytest.mark.parametrize("attempts", [0, 2])
async def test_last_answer_is_relayed_when_no_retry_is_left(
    sample: SampleFactory, make_proxy: ProxyFactory, session: aiohttp.ClientSession, attempts: int
) -> None:
    """When no retry is left (none allowed, or every upstream tried) the upstream's own 503
    reaches the client as it is, not a proxy-made error."""
    blue = await sample("blue", error_rate=1.0, error_status=503)
    green = await sample("green", error_rate=1.0, error_status=503)
    proxy = await make_proxy(proxy_config([blue.url], [green.url], retries={"attempts": attempts}))
    async with session.get(url_of(proxy) + "/x") as resp:
        assert resp.status == 503
        assert resp.headers["X-Upstream"] == ("blue" if attempts == 0 else "green")
        assert (await resp.json())["error"] == "injected"
    tries = sum(u.snapshot().requests for u in proxy.router.upstreams())
    assert tries == min(attempts + 1, 2)
