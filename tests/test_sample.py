"""The sample upstream, driven over real sockets with aiohttp's client."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from yarl import URL

from proxy.cli import build_parser
from proxy.tools.sample import SampleSettings, make_app, start

MiB = 1024 * 1024


@dataclass
class Upstream:
    settings: SampleSettings
    runner: web.AppRunner
    base: str

    def url(self, path: str) -> URL:
        # encoded=True: the path reaches the wire exactly as written (%2F stays %2F).
        return URL(self.base + path, encoded=True)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    settings = SampleSettings(name="blue")
    runner, port = await start(settings, "127.0.0.1", 0)
    try:
        yield Upstream(settings, runner, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def pattern(n: int) -> bytes:
    """What /bytes and /cut send: byte i is i % 256."""
    return (bytes(range(256)) * (n // 256 + 1))[:n]


async def test_start_binds_a_real_port(upstream: Upstream) -> None:
    port = int(upstream.base.rsplit(":", 1)[1])
    assert port > 0
    assert port == upstream.runner.addresses[0][1]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("DELETE", "/anything/else"),
        ("GET", "/healthz"),
        ("GET", "/headers"),
        ("GET", "/bytes/10"),
        ("GET", "/stream?chunks=1&interval=0"),
        ("POST", "/sink"),
        ("PUT", "/echo"),
        ("GET", "/status/404"),
        ("GET", "/status/204"),
        ("GET", "/status/99"),
        ("GET", "/delay/0"),
        ("GET", "/set-cookies"),
        ("GET", "/_control"),
    ],
)
async def test_every_response_names_the_upstream(
    upstream: Upstream, session: aiohttp.ClientSession, method: str, path: str
) -> None:
    async with session.request(method, upstream.url(path), data=b"abc") as resp:
        await resp.read()
        assert resp.headers.getall("X-Upstream") == ["blue"]


async def test_healthz(upstream: Upstream, session: aiohttp.ClientSession) -> None:
    async with session.get(upstream.url("/healthz")) as resp:
        assert (resp.status, await resp.text()) == (200, "ok")
    upstream.settings.healthy = False
    async with session.get(upstream.url("/healthz")) as resp:
        assert resp.status == 503


async def test_healthz_ignores_errors_and_latency(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    upstream.settings.error_rate = 1.0
    upstream.settings.latency = 30.0
    async with asyncio.timeout(5), session.get(upstream.url("/healthz")) as resp:
        assert resp.status == 200


async def test_ordinary_request_reports_method_and_raw_path(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    async with session.post(upstream.url("/a%2Fb/c?x=1&y=%20"), data=b"z" * 100_000) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body == {"upstream": "blue", "method": "POST", "path": "/a%2Fb/c?x=1&y=%20"}


async def test_known_path_with_other_method_is_ordinary(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    async with session.delete(upstream.url("/bytes/5")) as resp:
        assert await resp.json() == {"upstream": "blue", "method": "DELETE", "path": "/bytes/5"}
    async with session.post(upstream.url("/headers")) as resp:
        assert (await resp.json())["method"] == "POST"


async def test_error_rate_one_always_fails(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    upstream.settings.error_rate = 1.0
    upstream.settings.error_status = 503
    for _ in range(20):
        async with session.get(upstream.url("/x")) as resp:
            assert resp.status == 503
            assert await resp.json() == {"upstream": "blue", "error": "injected"}


async def test_error_rate_zero_never_fails(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    for _ in range(50):
        async with session.get(upstream.url("/x")) as resp:
            assert resp.status == 200
            await resp.read()


async def test_seeded_error_rate_is_reproducible_and_near_its_share(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
) -> None:
    n, rate, seed = 400, 0.3, 7
    settings = SampleSettings(name="green", error_rate=rate, error_status=502)
    server = await aiohttp_server(make_app(settings, seed=seed))
    statuses = []
    async with aiohttp.ClientSession() as client:
        for _ in range(n):
            async with client.get(server.make_url("/work")) as resp:
                await resp.read()
                statuses.append(resp.status)
    assert set(statuses) == {200, 502}
    failed = [status == 502 for status in statuses]
    # Sequential requests draw from the seeded generator in order.
    rng = random.Random(seed)
    assert failed == [rng.random() < rate for _ in range(n)]
    # Binomial(400, 0.3): mean 120, sd ~9.2; 5 sd either side.
    assert 74 <= sum(failed) <= 166


async def test_latency_delays_ordinary_requests(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    upstream.settings.latency = 0.05
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with session.get(upstream.url("/slow")) as resp:
        assert resp.status == 200
    assert loop.time() - began >= 0.05


async def test_headers_byte_for_byte(upstream: Upstream) -> None:
    # A raw socket, so nothing on the client side reorders, merges or re-encodes headers.
    port = int(upstream.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"GET /headers/a%2Fb?q=%7E HTTP/1.1\r\n"
            b"Host: example.test\r\n"
            b"X-B: 2\r\n"
            b"X-A: 1\r\n"
            b"x-b: 3\r\n"
            b"X-Latin: caf\xe9\r\n"
            b"Connection: close\r\n"
            b"\r\n"
        )
        async with asyncio.timeout(5):
            raw = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nX-Upstream: blue\r\n" in head + b"\r\n"
    body = json.loads(payload)
    assert body == {
        "upstream": "blue",
        "raw_path": "/headers/a%2Fb?q=%7E",
        "headers": [
            ["Host", "example.test"],
            ["X-B", "2"],
            ["X-A", "1"],
            ["x-b", "3"],
            ["X-Latin", "caf\u00e9"],
            ["Connection", "close"],
        ],
    }


async def test_headers_repeats_from_a_client(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    sent = CIMultiDict([("X-B", "2"), ("X-A", "1"), ("X-B", "3")])
    async with session.get(upstream.url("/headers/x"), headers=sent) as resp:
        body = await resp.json()
    assert [v for k, v in body["headers"] if k == "X-B"] == ["2", "3"]


async def test_headers_bare_path(upstream: Upstream, session: aiohttp.ClientSession) -> None:
    async with session.get(upstream.url("/headers")) as resp:
        assert (await resp.json())["raw_path"] == "/headers"


async def test_bytes_with_content_length(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    n = 3 * MiB + 5
    async with session.get(upstream.url(f"/bytes/{n}")) as resp:
        assert resp.status == 200
        assert resp.content_length == n
        assert "Transfer-Encoding" not in resp.headers
        body = await resp.read()
    assert body == pattern(n)


async def test_bytes_chunked(upstream: Upstream, session: aiohttp.ClientSession) -> None:
    n = 2 * MiB + 3
    async with session.get(upstream.url(f"/bytes/{n}?chunked=1")) as resp:
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in resp.headers
        body = await resp.read()
    assert body == pattern(n)


async def test_bytes_zero(upstream: Upstream, session: aiohttp.ClientSession) -> None:
    async with session.get(upstream.url("/bytes/0")) as resp:
        assert resp.content_length == 0
        assert await resp.read() == b""


async def test_stream_chunks_arrive_separately(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    chunks, size = 6, 16
    loop = asyncio.get_running_loop()
    arrivals: list[tuple[float, int]] = []
    url = upstream.url(f"/stream?chunks={chunks}&interval=60&size={size}")
    async with session.get(url) as resp:
        assert resp.headers["Transfer-Encoding"] == "chunked"
        while data := await resp.content.readany():
            arrivals.append((loop.time(), len(data)))
    assert sum(length for _, length in arrivals) == chunks * size
    assert len(arrivals) >= chunks / 2


@pytest.mark.parametrize("query", ["chunks=-1", "size=0", "interval=x"])
async def test_stream_rejects_bad_parameters(
    upstream: Upstream, session: aiohttp.ClientSession, query: str
) -> None:
    async with session.get(upstream.url(f"/stream?{query}")) as resp:
        assert resp.status == 400
        assert set(await resp.json()) == {"error", "detail"}


async def _body(data: bytes, piece: int) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), piece):
        yield data[offset : offset + piece]


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_sink_hashes_the_body(
    upstream: Upstream, session: aiohttp.ClientSession, method: str
) -> None:
    data = random.Random(1).randbytes(2 * MiB + 7)
    async with session.request(method, upstream.url("/sink"), data=_body(data, 100_000)) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


async def test_sink_empty_body(upstream: Upstream, session: aiohttp.ClientSession) -> None:
    async with session.post(upstream.url("/sink")) as resp:
        assert await resp.json() == {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_echo_round_trip(
    upstream: Upstream, session: aiohttp.ClientSession, method: str
) -> None:
    data = random.Random(2).randbytes(MiB + 11)
    headers = {"Content-Type": "application/x-test"}
    async with session.request(
        method, upstream.url("/echo"), data=_body(data, 64 * 1024), headers=headers
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert resp.content_type == "application/x-test"
        assert await resp.read() == data


@pytest.mark.parametrize("code", [200, 201, 404, 418, 429, 500, 502, 503, 599])
async def test_status_with_body(
    upstream: Upstream, session: aiohttp.ClientSession, code: int
) -> None:
    async with session.get(upstream.url(f"/status/{code}")) as resp:
        assert resp.status == code
        assert json.loads(await resp.read()) == {"upstream": "blue", "status": code}


@pytest.mark.parametrize("code", [204, 304])
async def test_status_without_body(
    upstream: Upstream, session: aiohttp.ClientSession, code: int
) -> None:
    async with session.get(upstream.url(f"/status/{code}")) as resp:
        assert resp.status == code
        assert await resp.read() == b""
    # The connection stays usable after a body-less answer.
    async with session.get(upstream.url("/healthz")) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("code", [0, 99, 100, 199, 600])
async def test_status_out_of_range(
    upstream: Upstream, session: aiohttp.ClientSession, code: int
) -> None:
    async with session.get(upstream.url(f"/status/{code}")) as resp:
        assert resp.status == 400


async def test_cut_body_is_a_payload_error(
    upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    n = 100_000
    received = bytearray()
    async with session.get(upstream.url(f"/cut/{n}")) as resp:
        assert resp.status == 200
        assert resp.content_length == 2 * n

        async def read_all() -> None:
            while data := await resp.content.readany():
                received.extend(data)

        with pytest.raises(aiohttp.ClientPayloadError):
            await read_all()
    assert bytes(received) == pattern(n)
    # The upstream keeps serving other connections.
    async with session.get(upstream.url("/healthz")) as resp:
        assert resp.status == 200


async def test_delay(upstream: Upstream, session: aiohttp.ClientSession) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with session.get(upstream.url("/delay/40")) as resp:
        assert resp.status == 200
        assert await resp.json() == {"upstream": "blue", "delay_ms": 40}
    assert loop.time() - began >= 0.04


async def test_set_cookies(upstream: Upstream, session: aiohttp.ClientSession) -> None:
    async with session.get(upstream.url("/set-cookies")) as resp:
        assert resp.status == 200
        assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert [v.decode() for k, v in resp.raw_headers if k.lower() == b"set-cookie"] == [
            "a=1",
            "b=2",
        ]


async def test_websocket_echo(upstream: Upstream) -> None:
    names: list[str | None] = []

    async def on_request_end(
        session: aiohttp.ClientSession,
        context: object,
        params: aiohttp.TraceRequestEndParams,
    ) -> None:
        names.append(params.response.headers.get("X-Upstream"))

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    async with (
        aiohttp.ClientSession(trace_configs=[trace]) as session,
        session.ws_connect(upstream.url("/ws")) as ws,
    ):
        assert names == ["blue"]
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=5) == "hello"
        await ws.send_bytes(b"\x00\x01\xff")
        assert await ws.receive_bytes(timeout=5) == b"\x00\x01\xff"
        await ws.close()
    assert ws.closed


async def test_websocket_closed_on_shutdown(session: aiohttp.ClientSession) -> None:
    runner, port = await start(SampleSettings(name="green"), "127.0.0.1", 0)
    try:
        ws = await session.ws_connect(f"http://127.0.0.1:{port}/ws")
    finally:
        cleanup = asyncio.create_task(runner.cleanup())
    message = await ws.receive(timeout=5)
    assert message.type is aiohttp.WSMsgType.CLOSE
    assert message.data == aiohttp.WSCloseCode.GOING_AWAY
    await ws.close()
    async with asyncio.timeout(5):
        await cleanup


async def test_control_get(upstream: Upstream, session: aiohttp.ClientSession) -> None:
    async with session.get(upstream.url("/_control")) as resp:
        assert await resp.json() == {
            "name": "blue",
            "error_rate": 0.0,
            "latency": 0.0,
            "error_status": 500,
            "healthy": True,
        }


async def test_control_updates_settings(upstream: Upstream, session: aiohttp.ClientSession) -> None:
    change = {"error_rate": 1, "latency": 0.01, "error_status": 503, "healthy": False}
    async with session.post(upstream.url("/_control"), json=change) as resp:
        assert resp.status == 200
        assert await resp.json() == {"name": "blue", **change}
    assert upstream.settings == SampleSettings("blue", 1.0, 0.01, 503, False)
    async with session.get(upstream.url("/x")) as resp:
        assert resp.status == 503
    async with session.get(upstream.url("/healthz")) as resp:
        assert resp.status == 503
    async with session.post(upstream.url("/_control"), json={"error_rate": 0.0}) as resp:
        assert (await resp.json())["error_rate"] == 0.0
    async with session.get(upstream.url("/x")) as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"error_rate": 1.5}',
        b'{"error_rate": -0.1}',
        b'{"error_rate": "0.5"}',
        b'{"error_rate": true}',
        b'{"latency": -1}',
        b'{"latency": NaN}',
        b'{"error_status": 200}',
        b'{"error_status": 503.0}',
        b'{"healthy": "yes"}',
        b'{"name": "green"}',
        b'{"error_rate": 0.5, "surprise": 1}',
    ],
)
async def test_control_rejects_bad_input(
    upstream: Upstream, session: aiohttp.ClientSession, body: bytes
) -> None:
    before = SampleSettings("blue")
    headers = {"Content-Type": "application/json"}
    async with session.post(upstream.url("/_control"), data=body, headers=headers) as resp:
        assert resp.status == 400
        problem: dict[str, Any] = await resp.json()
    assert set(problem) == {"error", "detail"}
    assert upstream.settings == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_run_prints_its_address_and_exits_cleanly(sig: signal.Signals) -> None:
    code = (
        "from proxy.tools.sample import SampleSettings, run; "
        "run(SampleSettings(name='canary'), '127.0.0.1', 0)"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip()
        prefix = "turnout upstream canary listening on http://127.0.0.1:"
        assert line.startswith(prefix)
        port = int(line.removeprefix(prefix))
        assert port > 0
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"http://127.0.0.1:{port}/healthz") as resp,
        ):
            assert resp.headers["X-Upstream"] == "canary"
        proc.send_signal(sig)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, stderr.decode()
        assert stderr == b""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "99999"],
        ["--port", "-1"],
        ["--port", "eighty"],
        ["--port", "0", "--error-rate", "2"],
        ["--port", "0", "--error-rate", "x"],
        # The bounds /_control enforces: a status under 100 made every failed request a
        # dropped connection, a huge latency a hang.
        ["--port", "0", "--error-status", "99"],
        ["--port", "0", "--error-status", "200"],
        ["--port", "0", "--error-status", "600"],
        ["--port", "0", "--latency", "1e9"],
        ["--port", "0", "--latency", "11m"],
    ],
)
def test_bad_sample_arguments_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["upstream", "--name", "blue", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err
    assert "Traceback" not in err
