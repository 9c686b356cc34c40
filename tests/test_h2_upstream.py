"""HTTP/2 towards upstreams (`pools.<pool>.protocol: h2c | h2`), against a real HTTP/2 server
(hypercorn): requests from HTTP/1.1 and HTTP/2 clients are multiplexed on a few connections
per upstream, bodies stream both ways, health checks speak HTTP/2, faults map as usual."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import httpx
import pytest
import trustme
from conftest import HOST, ProxyFactory, wait_for
from helpers.http2 import h2_pools, up
from helpers.tls import write_pair
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

from proxy.config import ConfigError, parse_config


@dataclass
class H2Server:
    """A hypercorn server; every request's HTTP version and client port is recorded."""

    name: str
    port: int = 0
    tls: bool = False
    versions: list[str] = field(default_factory=list)
    peers: set[int] = field(default_factory=set)
    probes: list[str] = field(default_factory=list)  # HTTP versions of the health checks
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}"

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/healthz":
            self.probes.append(scope["http_version"])
        else:
            self.versions.append(scope["http_version"])
            self.peers.add(scope["client"][1])
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, payload = 200, b""
        if path == "/echo":
            payload = body
        elif path.startswith("/bytes/"):
            payload = bytes(i % 256 for i in range(int(path.rsplit("/", 1)[1])))
        elif path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
        elif path.startswith("/delay/"):
            await asyncio.sleep(int(path.rsplit("/", 1)[1]) / 1000)
        elif path != "/healthz":
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            payload = json.dumps({"upstream": self.name, "path": path, "headers": headers}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"x-upstream", self.name.encode()),
                    (b"content-type", b"application/json"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


H2Factory = Callable[..., Awaitable[H2Server]]


@pytest.fixture
async def h2_server(tmp_path: Path) -> AsyncIterator[H2Factory]:
    servers: list[H2Server] = []
    ca = trustme.CA()

    async def make(name: str, *, tls: bool = False) -> H2Server:
        server = H2Server(name, tls=tls)
        sock = socket.socket()
        sock.bind((HOST, 0))
        server.port = sock.getsockname()[1]
        config = HypercornConfig()
        config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the socket from here
        config.accesslog = None
        config.errorlog = None
        if tls:
            cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, name)
            config.certfile, config.keyfile = cert, key
            ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        server.task = asyncio.create_task(
            serve(server.app, config, shutdown_trigger=server.stop.wait)  # type: ignore[arg-type]
        )
        servers.append(server)
        await wait_for(lambda: _listening(server.port), timeout=10)
        return server

    yield make
    for server in servers:
        await server.close()


def _listening(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), 0.2).close()
        return True
    except OSError:
        return False


async def test_http11_clients_reach_an_h2c_upstream_multiplexed(
    h2_server: H2Factory, make_proxy: ProxyFactory
) -> None:
    blue, green = await h2_server("blue"), await h2_server("green")
    proxy = await make_proxy(h2_pools(blue.url, green.url))
    await up(proxy)
    url = f"http://{HOST}:{proxy.port}"
    async with aiohttp.ClientSession() as session:

        async def get(i: int) -> dict[str, Any]:
            async with session.get(f"{url}/item/{i}", headers={"X-Custom": "v"}) as resp:
                assert resp.status == 200
                assert resp.headers["X-Upstream"] == "blue"
                return dict(await resp.json())

        answers = await asyncio.gather(*(get(i) for i in range(60)))
    assert sorted(a["path"] for a in answers) == sorted(f"/item/{i}" for i in range(60))
    assert answers[0]["headers"]["x-custom"] == "v"
    assert "connection" not in answers[0]["headers"]
    assert set(blue.versions) == {"2"}
    # Sixty requests, many at once, over very few connections to the upstream.
    assert len(blue.peers) <= 2, blue.peers


async def test_http2_clients_and_bodies_both_ways(
    h2_server: H2Factory, make_proxy: ProxyFactory
) -> None:
    blue, green = await h2_server("blue"), await h2_server("green")
    proxy = await make_proxy(h2_pools(blue.url, green.url, split=50))
    await up(proxy)
    payload = bytes(range(256)) * 4096
    async with httpx.AsyncClient(
        http1=False, http2=True, base_url=f"http://{HOST}:{proxy.port}", timeout=20
    ) as client:
        posted, fetched = await asyncio.gather(
            client.post("/echo", content=payload), client.get("/bytes/3000000")
        )
        assert posted.status_code == 200
        assert posted.content == payload
        assert fetched.status_code == 200
        assert fetched.content == bytes(i % 256 for i in range(3000000))
        answers = await asyncio.gather(*(client.get("/") for _ in range(200)))
    pools = [a.headers["x-upstream"] for a in answers]
    assert abs(pools.count("green") - 100) <= 3, pools.count("green")


async def test_faults_of_an_h2_upstream_map_as_usual(
    h2_server: H2Factory, make_proxy: ProxyFactory
) -> None:
    blue, green = await h2_server("blue"), await h2_server("green")
    proxy = await make_proxy(
        h2_pools(blue.url, green.url, retries={"attempts": 0}, health_check={"interval": "60s"})
    )
    await up(proxy)
    url = f"http://{HOST}:{proxy.port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/status/503") as resp:
            assert resp.status == 503  # the upstream's own answer, relayed
        await blue.close()
        async with session.get(url + "/") as resp:
            assert resp.status == 502
            assert (await resp.json())["pool"] == "blue"
    # Health checks speak HTTP/2 too (an HTTP/2-only upstream would refuse HTTP/1.1).
    assert green.probes
    assert set(green.probes) == {"2"}


async def test_h2_over_tls_with_alpn(
    h2_server: H2Factory, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    blue = await h2_server("blue", tls=True)
    data = h2_pools(blue.url, blue.url.replace("blue", "blue"), protocol="h2")
    for pool in ("blue", "green"):
        data["pools"][pool]["tls"] = {"ca": str(tmp_path / "ca.pem")}
    proxy = await make_proxy(data)
    await up(proxy)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{HOST}:{proxy.port}/x") as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["path"] == "/x"
    assert set(blue.versions) == {"2"}


def test_the_protocol_must_fit_the_urls() -> None:
    with pytest.raises(ConfigError, match=r"pools\.blue\.upstreams\[0\]\.url: protocol h2 needs"):
        parse_config(h2_pools("http://127.0.0.1:1", "https://127.0.0.1:2", protocol="h2"))
    with pytest.raises(ConfigError, match="protocol h2c needs http://"):
        parse_config(h2_pools("https://127.0.0.1:1", "http://127.0.0.1:2", protocol="h2c"))
    assert parse_config(h2_pools("http://a:1", "http://b:2")).pools.blue.protocol == "h2c"
    assert ssl is not None


async def test_grpc_timeout_is_the_calls_deadline(
    h2_server: H2Factory, make_proxy: ProxyFactory
) -> None:
    """A gRPC call that says `grpc-timeout: 200m` gets DEADLINE_EXCEEDED from Turnout when its
    upstream has not answered by then, well before timeouts.response_headers (30 s), even from
    a client that keeps no deadline of its own. This upstream knows nothing of gRPC deadlines
    (as a hung process), so no deadline but Turnout's can end the call."""
    blue = await h2_server("blue")
    proxy = await make_proxy(h2_pools(blue.url, blue.url))
    await up(proxy)
    message = b"\x00" + (1).to_bytes(4, "big") + b"x"
    headers = {"content-type": "application/grpc", "te": "trailers", "grpc-timeout": "200m"}
    client = httpx.AsyncClient(http1=False, http2=True, timeout=10.0)
    async with client, asyncio.timeout(4):
        resp = await client.post(
            f"http://{HOST}:{proxy.port}/delay/5000", content=message, headers=headers
        )
    assert resp.status_code == 200
    said = unquote(resp.headers["grpc-message"])
    assert resp.headers["grpc-status"] == "4", said
    assert "grpc-timeout of 0.2s passed" in said
    assert blue.versions == ["2"]  # one attempt: the deadline is the call's
