"""WebSocket upgrades are tunnelled to the chosen upstream; other upgrades are not relayed."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from conftest import HOST, ProxyFactory, SampleFactory, Stack, proxy_config, raw_request, wait_for

from proxy.runtime import Proxy

MiB = 1024 * 1024
TIMEOUT = 10.0


def in_flight(proxy: Proxy) -> dict[str, int]:
    return {u.key: u.snapshot().in_flight for u in proxy.router.upstreams()}


async def test_websocket_echo_text_and_binary(stack: Stack) -> None:
    async with asyncio.timeout(TIMEOUT):
        async with stack.session.ws_connect(stack.url + "/ws") as ws:
            await ws.send_str("hello through the proxy")
            assert await ws.receive_str() == "hello through the proxy"
            await ws.send_bytes(b"\x00\x01\x02binary\xff")
            assert await ws.receive_bytes() == b"\x00\x01\x02binary\xff"
            # Larger than any socket buffer on the way: flow control inside the tunnel.
            big = os.urandom(3 * MiB)
            await ws.send_bytes(big)
            assert await ws.receive_bytes() == big
            for i in range(50):
                await ws.send_str(f"message {i}")
            for i in range(50):
                assert await ws.receive_str() == f"message {i}"
            assert in_flight(stack.proxy) == {"blue/0": 1, "green/0": 0}
            await ws.close()
        assert ws.close_code == aiohttp.WSCloseCode.OK
        # The tunnel is torn down on both sides and its bookkeeping settles.
        await wait_for(lambda: not stack.proxy.connections)
        await wait_for(lambda: in_flight(stack.proxy) == {"blue/0": 0, "green/0": 0})


async def test_the_access_log_counts_a_tunnels_bytes(
    sample: SampleFactory, make_proxy: ProxyFactory, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    blue = await sample("blue")
    path = tmp_path / "access.log"
    proxy = await make_proxy(proxy_config([blue.url], [], access_log={"to": str(path)}))
    big = os.urandom(2 * MiB)
    async with asyncio.timeout(TIMEOUT):
        async with session.ws_connect(f"http://{HOST}:{proxy.port}/ws") as ws:
            await ws.send_bytes(big)
            assert await ws.receive_bytes() == big
            await ws.close()

        def lines() -> list[dict[str, Any]]:
            text = path.read_text() if path.exists() else ""
            return [json.loads(line) for line in text.splitlines()]

        await wait_for(lambda: len(lines()) == 1)
    (line,) = lines()
    assert (line["status"], line["target"]) == (101, "/ws")
    # A frame carries its payload plus a few bytes of header (and the client's mask).
    assert 2 * MiB <= line["bytes_in"] < 2 * MiB + 1024
    assert 2 * MiB <= line["bytes_out"] < 2 * MiB + 1024


@pytest.mark.parametrize(
    ("split", "override", "pool"),
    [(100, None, "green"), (0, None, "blue"), (100, "blue", "blue"), (0, "green", "green")],
)
async def test_websocket_goes_to_the_pool_the_split_or_override_chooses(
    stack: Stack, split: float, override: str | None, pool: str
) -> None:
    stack.proxy.control.put_split(split)
    headers = {"X-Turnout-Pool": override} if override else {}
    seen: list[str] = []

    async def on_request_end(
        session: aiohttp.ClientSession, context: object, params: aiohttp.TraceRequestEndParams
    ) -> None:
        seen.append(params.response.headers["X-Upstream"])

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    async with (
        asyncio.timeout(TIMEOUT),
        aiohttp.ClientSession(trace_configs=[trace]) as session,
        session.ws_connect(stack.url + "/ws", headers=headers) as ws,
    ):
        await ws.send_str(pool)
        assert await ws.receive_str() == pool
        other = "green" if pool == "blue" else "blue"
        assert in_flight(stack.proxy) == {f"{pool}/0": 1, f"{other}/0": 0}
    assert seen == [pool]


async def test_upstream_messages_and_close_reach_the_client(
    make_proxy: ProxyFactory, sample: SampleFactory, session: aiohttp.ClientSession
) -> None:
    """The upstream speaks first and closes: both reach the client through the tunnel."""

    async def talker(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("welcome")
        await ws.send_bytes(b"\x00" * 100_000)
        await ws.close(code=4000, message=b"bye")
        return ws

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/talk", talker)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        green = await sample("green")
        url = f"http://{HOST}:{runner.addresses[0][1]}"
        proxy = await make_proxy(proxy_config([url], [green.url]))
        async with asyncio.timeout(TIMEOUT):
            async with session.ws_connect(f"http://{HOST}:{proxy.port}/talk") as ws:
                assert await ws.receive_str() == "welcome"
                assert await ws.receive_bytes() == b"\x00" * 100_000
                msg = await ws.receive()
                assert msg.type is WSMsgType.CLOSE
                assert msg.data == 4000
                assert msg.extra == "bye"
            await wait_for(lambda: not proxy.connections)
            await wait_for(lambda: in_flight(proxy)["blue/0"] == 0)
    finally:
        await runner.cleanup()


def masked_text_frame(text: bytes) -> bytes:
    """A client-to-server WebSocket text frame (RFC 6455 §5.2), masked as clients must."""
    assert len(text) < 126
    mask = os.urandom(4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(text))
    return bytes([0x81, 0x80 | len(text)]) + mask + payload


async def test_bytes_sent_right_after_the_handshake_are_relayed(stack: Stack) -> None:
    """A client may send its first frame in the same packet as the upgrade request; the proxy
    holds it until the upstream has switched protocols."""
    key = base64.b64encode(os.urandom(16))
    handshake = (
        b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %b\r\nSec-WebSocket-Version: 13\r\n\r\n" % key
    )
    reader, writer = await asyncio.open_connection(HOST, stack.proxy.port)
    try:
        async with asyncio.timeout(TIMEOUT):
            writer.write(handshake + masked_text_frame(b"early bird"))
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            assert b"\r\nupgrade: websocket\r\n" in head.lower()
            # The echo, unmasked as servers send: FIN + text, length, payload.
            assert await reader.readexactly(12) == b"\x81\x0aearly bird"
    finally:
        writer.close()


async def test_websocket_request_answered_without_switching_is_a_normal_response(
    stack: Stack,
) -> None:
    """The upstream declines the upgrade (a plain 200): the client gets that answer and the
    connection is no tunnel."""
    request = (
        b"GET /headers HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %b\r\nSec-WebSocket-Version: 13\r\n\r\n"
        % base64.b64encode(os.urandom(16))
    )
    data = await raw_request(stack.proxy.port, request)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), data
    assert b"X-Upstream: blue" in head
    assert b'"raw_path": "/headers"' in body
    assert not stack.proxy.tunnels


async def test_h2c_upgrade_is_not_relayed(stack: Stack) -> None:
    request = (
        b"GET /headers HTTP/1.1\r\nHost: test\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
    )
    data = await raw_request(stack.proxy.port, request)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), data
    assert b"upgrade" not in head.lower().replace(b"connection: upgrade", b"")
    seen = {name.lower(): value for name, value in json.loads(body)["headers"]}
    assert "upgrade" not in seen
    assert "http2-settings" not in seen
    assert "upgrade" not in seen.get("connection", "").lower()
    assert seen["host"] == "test"


async def test_h2c_upgrade_via_aiohttp_gets_a_normal_response(stack: Stack) -> None:
    headers = {
        "Connection": "Upgrade, HTTP2-Settings",
        "Upgrade": "h2c",
        "HTTP2-Settings": "AAMAAABkAAQCAAAAAAIAAAAA",
    }
    async with asyncio.timeout(TIMEOUT):
        async with stack.session.get(stack.url + "/headers", headers=headers) as resp:
            assert resp.status == 200
            assert "Upgrade" not in resp.headers
            names = {name.lower() for name, _ in (await resp.json())["headers"]}
    assert not names & {"upgrade", "http2-settings"}


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\nSSH-2.0-client\r\n",
    ],
    ids=["connect", "connect-with-bytes"],
)
async def test_connect_is_405(stack: Stack, request_bytes: bytes) -> None:
    data = await raw_request(stack.proxy.port, request_bytes)
    head = data.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 405 "), data
    assert b"SSH" not in data
    assert b"X-Upstream" not in head  # answered by the proxy, never forwarded
    assert in_flight(stack.proxy) == {"blue/0": 0, "green/0": 0}
    assert stack.proxy.router.pools["blue"][0].snapshot().requests == 0
