"""HTTP/2 from clients (h2c with prior knowledge, ALPN h2 over TLS): every stream is routed,
split, forced, retried and drained like an HTTP/1.1 request; flow control holds both ways;
a client that resets streams in a loop is sent away."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import Counter
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import pytest
import trustme
from conftest import HOST, ProxyFactory, SampleFactory, Stack, proxy_config, wait_for
from helpers.http2 import RawH2
from helpers.raw_http import RawUpstreamFactory
from helpers.tls import write_pair
from hyperframe.frame import ContinuationFrame, HeadersFrame, SettingsFrame

from proxy.http.h2front import HIGH_WATER, H2Session

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2c(port: int) -> httpx.AsyncClient:
    """An HTTP/2-only client: prior knowledge over plain TCP, one connection."""
    return httpx.AsyncClient(
        http1=False, http2=True, base_url=f"http://{HOST}:{port}", timeout=10.0
    )


def sessions(stack: Stack) -> list[H2Session]:
    return list(stack.proxy.serving.sessions)  # type: ignore[arg-type]


async def test_curl_with_prior_knowledge_is_answered_over_http2(stack: Stack) -> None:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        *("-sS", "-i", "--http2-prior-knowledge", f"http://{HOST}:{stack.proxy.port}/bytes/10"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/2 200"), head
    assert b"x-upstream: blue" in head
    assert b"via: 1.1 turnout" in head
    assert body == bytes(range(10))


async def test_split_is_per_stream_on_one_connection(
    sample: SampleFactory, make_proxy: ProxyFactory
) -> None:
    blue = await sample("blue")
    green = await sample("green")
    proxy = await make_proxy(proxy_config([blue.url], [green.url], split=30))
    seen: Counter[str] = Counter()
    async with h2c(proxy.port) as client:
        for start in range(0, 1000, 50):
            answers = await asyncio.gather(*(client.get("/") for _ in range(50)))
            for resp in answers:
                assert resp.status_code == 200
                assert resp.http_version == "HTTP/2"
                seen[resp.headers["x-upstream"]] += 1
            assert start < 1000
    assert len(proxy.serving.sessions) == 1  # one client connection carried every request
    assert abs(seen["green"] / 10 - 30) <= 1.5, seen


async def test_request_bodies_and_large_responses_stream_both_ways(stack: Stack) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: far more than one flow-control window
    async with h2c(stack.proxy.port) as client:
        posted, fetched = await asyncio.gather(
            client.post("/echo", content=payload),
            client.get("/bytes/3000000"),
        )
        assert posted.status_code == 200
        assert posted.content == payload
        assert fetched.status_code == 200
        assert fetched.content == bytes(i % 256 for i in range(3000000))
        head = await client.head("/bytes/100")
        assert head.status_code == 200
        assert head.content == b""


SCRIPTED_ANSWERS = {
    b"/named": b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-secret\r\nX-Secret: 1\r\n"
    b"X-Kept: 2\r\nContent-Length: 2\r\n\r\nok",
    b"/no-content": b"HTTP/1.1 204 No Content\r\nX-Kept: 3\r\n\r\n",
    b"/until-close": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it, until the close",
    b"/bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
}


async def test_answers_reach_http2_clients_as_fields_whatever_their_framing(
    raw_upstream: RawUpstreamFactory, make_proxy: ProxyFactory
) -> None:
    """An HTTP/1.1 upstream's answers as an HTTP/2 client gets them: hop-by-hop fields (and
    those Connection names) dropped, Via added, the length kept, a 204 without a body, a body
    delimited by the upstream's close ended as a whole stream, and an answer found invalid
    before any of it left a 502."""
    upstream = await raw_upstream(lambda seen: SCRIPTED_ANSWERS[seen.target])
    proxy = await make_proxy(proxy_config([upstream.url], [upstream.url], retries={"attempts": 0}))
    async with h2c(proxy.port) as client:
        named = await client.get("/named")
        assert named.status_code == 200
        assert named.content == b"ok"
        assert named.headers["x-kept"] == "2"
        assert "x-secret" not in named.headers
        assert "connection" not in named.headers
        assert named.headers["content-length"] == "2"
        assert named.headers["via"] == "1.1 turnout"
        empty = await client.get("/no-content")
        assert empty.status_code == 204
        assert empty.content == b""
        assert empty.headers["x-kept"] == "3"
        whole = await client.get("/until-close")
        assert whole.status_code == 200
        assert whole.content == b"all of it, until the close"
        bad = await client.get("/bad-chunk")
        assert bad.status_code == 502
        assert bad.json()["detail"].startswith("invalid response")
        assert (await client.get("/named")).content == b"ok"  # the connection goes on


async def test_request_fields_reach_the_upstream_as_http11(stack: Stack) -> None:
    async with h2c(stack.proxy.port) as client:
        resp = await client.get("/headers/a%20b?q=1", headers={"x-custom": "v", "cookie": "a=1"})
    received = {k.lower(): v for k, v in resp.json()["headers"]}
    assert resp.json()["raw_path"] == "/headers/a%20b?q=1"
    assert received["host"] == f"{HOST}:{stack.proxy.port}"
    assert received["x-custom"] == "v"
    assert received["cookie"] == "a=1"
    assert received["x-forwarded-for"] == HOST
    assert "transfer-encoding" not in received


async def test_forced_pool_and_proxy_errors_per_stream(
    sample: SampleFactory, make_proxy: ProxyFactory, dead_url: Any
) -> None:
    blue = await sample("blue")
    green = await sample("green")
    proxy = await make_proxy(proxy_config([blue.url], [green.url]))
    dead = dead_url()
    broken = await make_proxy(proxy_config([dead], [dead], retries={"attempts": 0}))
    async with h2c(proxy.port) as client, h2c(broken.port) as failing:
        forced = await client.get("/", headers={"x-turnout-pool": "green"})
        assert forced.headers["x-upstream"] == "green"
        refused = await failing.get("/")
        assert refused.status_code in (502, 503)
        assert refused.headers["content-type"] == "application/json"
        assert refused.json()["pool"] == "blue"
        # The connection goes on after a failed stream.
        assert (await failing.get("/")).status_code == refused.status_code


async def test_alpn_h2_over_tls(
    sample: SampleFactory, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "listener")
    blue = await sample("blue")
    proxy = await make_proxy(
        proxy_config(
            [blue.url],
            [blue.url],
            listen={"host": HOST, "port": 0, "tls": {"cert": cert, "key": key}},
        )
    )
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with httpx.AsyncClient(http2=True, verify=context, timeout=10.0) as client:
        resp = await client.get(f"https://{HOST}:{proxy.port}/headers")
    assert resp.http_version == "HTTP/2"
    received = {k.lower(): v for k, v in resp.json()["headers"]}
    assert received["x-forwarded-proto"] == "https"
    # HTTP/1.1 clients on the same listener are unchanged.
    async with httpx.AsyncClient(http2=False, verify=context, timeout=10.0) as client:
        resp = await client.get(f"https://{HOST}:{proxy.port}/")
    assert resp.http_version == "HTTP/1.1"
    assert resp.status_code == 200


async def test_http2_can_be_turned_off(sample: SampleFactory, make_proxy: ProxyFactory) -> None:
    blue = await sample("blue")
    proxy = await make_proxy(
        proxy_config([blue.url], [blue.url], listen={"host": HOST, "port": 0, "http2": False})
    )
    reader, writer = await asyncio.open_connection(HOST, proxy.port)
    writer.write(PREFACE)
    async with asyncio.timeout(5):
        data = await reader.read(-1)
    writer.close()
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"HTTP/2 is not enabled on this listener" in data


async def test_a_preface_in_pieces_opens_http2_and_a_late_one_is_refused(
    sample: SampleFactory, make_proxy: ProxyFactory
) -> None:
    """The preface may arrive over several reads; after an HTTP/1.1 request it is refused
    with a 400 that says so (not llhttp's internal words)."""
    blue = await sample("blue")
    proxy = await make_proxy(proxy_config([blue.url], [blue.url]))
    for cut in (3, 16, 18, 20):
        reader, writer = await asyncio.open_connection(HOST, proxy.port)
        writer.write(PREFACE[:cut])
        await writer.drain()
        await wait_for(lambda: any(c.held for c in proxy.connections))
        writer.write(PREFACE[cut:] + SettingsFrame(0).serialize())
        async with asyncio.timeout(5):
            head = await reader.readexactly(9)  # the server's SETTINGS frame header
        writer.close()
        assert head[3] == 0x4, (cut, head)  # a SETTINGS frame, not an HTTP/1.1 status line

    reader, writer = await asyncio.open_connection(HOST, proxy.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(PREFACE)
        data = await reader.read(-1)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200 ")
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"an HTTP/2 preface may only open a connection" in data
    assert b"Pause on" not in data


async def test_rapid_reset_is_sent_away_and_others_are_unaffected(stack: Stack) -> None:
    attacker = await RawH2.open(stack.proxy.port)
    try:
        for _ in range(1000):
            stream_id = attacker.request("/delay/200")
            attacker.conn.reset_stream(stream_id)
            attacker.flush()
            if attacker.writer.is_closing():
                break
            await asyncio.sleep(0)  # let the proxy read
        await attacker.until(lambda: attacker.goaways)
        assert attacker.goaways[0][1] == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    finally:
        attacker.close()
    async with h2c(stack.proxy.port) as client:
        assert (await client.get("/")).status_code == 200
    # Every stream the attacker opened was let go: nothing of it is left in flight.
    await wait_for(lambda: stack.proxy.in_flight == 0 and not stack.proxy.connections)


async def test_a_reader_that_gives_no_window_holds_back_its_upstream(stack: Stack) -> None:
    """The client's window is 65,535 bytes and never grows: the proxy buffers at most about
    HIGH_WATER beyond it for the stream and stops reading its upstream."""
    client = await RawH2.open(stack.proxy.port)
    try:
        stream_id = client.request("/bytes/20000000")
        await client.until(lambda: client.of(h2.events.DataReceived))
        await wait_for(lambda: any(sessions(stack)))
        (session,) = sessions(stack)
        await wait_for(lambda: stream_id in session.streams)
        stream = session.streams[stream_id]
        await wait_for(lambda: stream.blocked != 0)
        buffered = session.queued(stream_id)
        assert buffered <= HIGH_WATER + 262144, buffered
        # Held, not dropped: a window opened later lets the rest through.
        received = sum(len(e.data) for e in client.of(h2.events.DataReceived))
        client.conn.increment_flow_control_window(20000000)
        client.conn.increment_flow_control_window(20000000, stream_id)
        client.flush()
        for event in client.of(h2.events.DataReceived):
            client.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)

        def done() -> bool:
            return bool(client.of(h2.events.StreamEnded))

        await client.until(done, timeout=30)
        received = sum(len(e.data) for e in client.of(h2.events.DataReceived))
        assert received == 20000000
    finally:
        client.close()


async def test_shutdown_finishes_streams_in_flight_and_says_goaway(stack: Stack) -> None:
    client = await RawH2.open(stack.proxy.port)
    try:
        stream_id = client.request("/delay/300")
        await wait_for(lambda: stack.proxy.in_flight == 1)
        shutdown = asyncio.create_task(stack.proxy.shutdown(timeout=5.0))
        await client.until(lambda: client.of(h2.events.StreamEnded), timeout=10)
        responses = client.of(h2.events.ResponseReceived)
        assert [r.stream_id for r in responses] == [stream_id]
        assert dict(responses[0].headers)[b":status"] == b"200"
        await client.until(lambda: client.closed, timeout=10)
        # Once the stream is done: the last stream served, then the connection closes.
        assert client.goaways == [(stream_id, 0)]
        await shutdown
    finally:
        client.close()


async def test_a_request_in_flight_at_shutdown_is_answered_to_an_h2_library_client(
    stack: Stack,
) -> None:
    """httpx (on h2's state machine) fails every open stream when a GOAWAY arrives: none is
    sent while a stream is in flight."""
    async with h2c(stack.proxy.port) as client:
        assert (await client.get("/")).status_code == 200
        slow = asyncio.create_task(client.get("/delay/300"))
        await wait_for(lambda: stack.proxy.in_flight == 1)
        shutdown = asyncio.create_task(stack.proxy.shutdown(timeout=5.0))
        assert (await slow).status_code == 200
        await shutdown


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (b":path", b"/a\x01b"),
        (b":path", b"/a\tb"),
        (b":method", b"GE(T"),
        (b":authority", b"t\x7fu"),
        (b"content-length", b"1x"),
        (b"x-a", b"1\r\ntransfer-encoding: chunked"),  # a field smuggling another
    ],
)
async def test_a_head_http11_could_not_carry_is_refused(
    stack: Stack, field: bytes, value: bytes
) -> None:
    """The codecs pass these (HTTP/2 allows them or does not look); an upstream on HTTP/1.1
    must never be sent a request line or a Host field they would break."""
    client = await RawH2.open(stack.proxy.port)
    client.conn.config.validate_outbound_headers = False
    try:
        stream_id = client.conn.get_next_available_stream_id()
        fields = {b":method": b"GET", b":scheme": b"http", b":authority": b"t", b":path": b"/"}
        fields[field] = value
        client.conn.send_headers(stream_id, list(fields.items()), end_stream=True)
        client.flush()

        def refused() -> bool:
            return bool(client.of(h2.events.StreamReset) or client.goaways)

        await client.until(refused)
        assert refused()
        assert not client.of(h2.events.ResponseReceived)
    finally:
        client.close()


async def test_head_limits_hold_per_stream(sample: SampleFactory, make_proxy: ProxyFactory) -> None:
    blue = await sample("blue")
    listen = {"host": HOST, "port": 0, "max_header_fields": 8, "max_request_target": 256}
    proxy = await make_proxy(proxy_config([blue.url], [blue.url], listen=listen))
    async with h2c(proxy.port) as client:
        assert (await client.get("/", headers={"x-a": "1"})).status_code == 200
        many = await client.get("/", headers={f"x-{i}": "1" for i in range(12)})
        assert many.status_code == 431
        assert many.json()["detail"] == "request header fields too large"
        long = await client.get("/" + "a" * 300)
        assert long.status_code == 414
        # The connection serves on after a refused stream.
        assert (await client.get("/")).status_code == 200


@pytest.mark.parametrize("attack", ["continuation-flood", "oversized-header-list"])
async def test_header_floods_end_the_connection_not_the_proxy(stack: Stack, attack: str) -> None:
    reader, writer = await asyncio.open_connection(HOST, stack.proxy.port)
    writer.write(PREFACE + SettingsFrame(0).serialize())
    if attack == "continuation-flood":
        # A header block that never ends: HEADERS without END_HEADERS, then CONTINUATIONs.
        first = HeadersFrame(1)
        first.data = b"\x82\x86\x84"
        writer.write(first.serialize())
        more = ContinuationFrame(1)
        more.data = b"\x40" + b"a" * 16000
        frame = more.serialize()
        for _ in range(200):
            writer.write(frame)
    else:
        client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        client.initiate_connection()
        client.data_to_send()
        fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"t")]
        fields += [(b":path", b"/"), *[(b"x-big", b"a" * 4000)] * 50]
        client.send_headers(1, fields, end_stream=True)
        writer.write(client.data_to_send())
    received = bytearray()
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(10):
            while chunk := await reader.read(65536):
                received += chunk
    writer.close()
    kinds = []
    while len(received) >= 9:
        size = int.from_bytes(received[:3], "big") + 9
        kinds.append(received[3])
        del received[:size]
    assert 0x7 in kinds, kinds  # GOAWAY, then the connection closed
    assert stack.proxy.in_flight == 0
    async with h2c(stack.proxy.port) as other:
        assert (await other.get("/")).status_code == 200


def raw_frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """A frame built by hand: what a library would refuse to send."""
    head = len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big")
    return head + payload


GET_BLOCK = b"\x82\x86\x84\x41\x01t"  # :method GET, :scheme http, :path /, :authority t
END_STREAM_AND_HEADERS = 0x5
MALFORMED = {
    "data-on-stream-0": (raw_frame(0x0, 0x1, 0, b"x"), "PROTOCOL_ERROR"),
    # The connection's window pushed past 2^31-1.
    "window-overflow": (
        raw_frame(0x8, 0, 0, (0x7FFFFFFF).to_bytes(4, "big")),
        "FLOW_CONTROL_ERROR",
    ),
    # A frame longer than SETTINGS_MAX_FRAME_SIZE (16,384 until the proxy says otherwise).
    "oversized-frame": (
        raw_frame(0x1, 0x4, 1, GET_BLOCK) + raw_frame(0x0, 0x1, 1, b"x" * 20000),
        "FRAME_SIZE_ERROR",
    ),
    "settings-length": (raw_frame(0x4, 0, 0, b"12345"), "FRAME_SIZE_ERROR"),
    # A field block HPACK cannot decode (an index far past both tables).
    "hpack-garbage": (
        raw_frame(0x1, END_STREAM_AND_HEADERS, 1, b"\xff\xff\xff\x7f"),
        "COMPRESSION_ERROR",
    ),
    # A client may open only odd-numbered streams.
    "even-stream": (raw_frame(0x1, END_STREAM_AND_HEADERS, 2, GET_BLOCK), "PROTOCOL_ERROR"),
}


@pytest.mark.parametrize("attack", MALFORMED, ids=list(MALFORMED))
async def test_malformed_frames_are_a_goaway_with_their_code(stack: Stack, attack: str) -> None:
    frames, code = MALFORMED[attack]
    reader, writer = await asyncio.open_connection(HOST, stack.proxy.port)
    writer.write(PREFACE + SettingsFrame(0).serialize() + frames)
    received = bytearray()
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(10):
            while chunk := await reader.read(65536):
                received += chunk
    writer.close()
    goaways = []
    while len(received) >= 9:
        size = int.from_bytes(received[:3], "big") + 9
        if received[3] == 0x7:
            goaways.append(int.from_bytes(received[13:17], "big"))
        del received[:size]
    assert [h2.errors.ErrorCodes(c).name for c in goaways] == [code]
    await wait_for(lambda: stack.proxy.in_flight == 0 and not stack.proxy.serving.sessions)
    async with h2c(stack.proxy.port) as other:
        assert (await other.get("/")).status_code == 200


async def test_a_streams_window_overflow_ends_that_stream_or_its_connection(
    stack: Stack,
) -> None:
    """RFC 9113 §6.9.1 lets the receiver end the stream (RST_STREAM, h2's choice) or the
    connection (GOAWAY, libnghttp2's), with FLOW_CONTROL_ERROR; others are unaffected."""
    client = await RawH2.open(stack.proxy.port)
    try:
        slow = client.request("/delay/300")
        fine = client.request("/")
        client.writer.write(raw_frame(0x8, 0, slow, (0x7FFFFFFF).to_bytes(4, "big")))
        await client.until(
            lambda: (
                client.goaways
                or (client.of(h2.events.StreamReset) and client.of(h2.events.StreamEnded))
            )
        )
        if client.goaways:
            assert [code for _, code in client.goaways] == [h2.errors.ErrorCodes.FLOW_CONTROL_ERROR]
        else:
            (reset,) = client.of(h2.events.StreamReset)
            assert (reset.stream_id, reset.error_code) == (
                slow,
                h2.errors.ErrorCodes.FLOW_CONTROL_ERROR,
            )
            assert [e.stream_id for e in client.of(h2.events.StreamEnded)] == [fine]
    finally:
        client.close()
    async with h2c(stack.proxy.port) as other:
        assert (await other.get("/")).status_code == 200
    await wait_for(lambda: stack.proxy.in_flight == 0)
